"""``distrib-bench``: collective bandwidth and latency tables, beside torch's gloo and Open MPI.

Run ``distrib-bench --help`` (or ``python -m distrib.bench``). The tuning and
peer experiments behind the library's choices live in the repository's
``benchmarks/`` folder.
"""
