"""Hogwild A3C on gymnasium's CartPole-v1 (or another discrete-action env), in numpy.

N worker processes, each with its own environment, share one actor-critic
network and one Adam optimizer whose statistics live in shared memory
(``distrib.shm`` + ``distrib.optim.Adam(...).share_memory()``). Each worker
plays n-step rollouts with a copy of the shared parameters taken at the start
of the rollout (as in the A3C paper), computes the gradients by hand (no
autograd) and applies them to the shared parameters without locks.
The main process only monitors: it shows a progress bar, stops the workers
once the 100-episode mean return reaches the env's threshold (475 for
CartPole-v1) and a greedy check of that policy over 20 episodes reaches it too
(the test process of the A3C reference implementations), or once time runs
out; it then evaluates the stopped policy greedily on 20 fresh episodes and
plots the learning curve.

    python examples/a3c_cartpole.py                      # CartPole-v1, 2 workers
    python examples/a3c_cartpole.py --env Acrobot-v1 --max-seconds 60

The last line reads ``solved: mean100=<x> steps=<n> seconds=<t>`` or
``not solved: ...``; the exit status is 0 when solved and the greedy
evaluation also reaches the threshold, 1 otherwise.
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the 30 s budget counts imports and process start too

import argparse  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

# One BLAS thread per worker (what torch's A3C examples set too): N workers with
# a thread pool per core each would oversubscribe the machine. Before numpy loads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import distrib.multiprocessing as mp  # noqa: E402
from distrib import shm  # noqa: E402
from distrib.optim import Adam  # noqa: E402

# ---------------------------------------------------------------- the network
# Two one-hidden-layer tanh MLPs: the actor (state -> action logits) and the
# critic (state -> value). Separate trunks keep the value loss's large
# gradients out of the policy; only the actor runs at every environment step.


def init_params(obs_dim: int, n_actions: int, hidden: int, seed: int) -> dict[str, np.ndarray]:
    """Scaled-normal weights; a near-zero last actor layer starts from a uniform policy."""
    rng = np.random.default_rng(seed)

    def dense(n_in: int, n_out: int, gain: float) -> np.ndarray:
        return rng.standard_normal((n_in, n_out)) * gain / np.sqrt(n_in)

    return {
        "actor.w1": dense(obs_dim, hidden, 1.0),
        "actor.b1": np.zeros(hidden),
        "actor.w2": dense(hidden, n_actions, 0.01),
        "actor.b2": np.zeros(n_actions),
        "critic.w1": dense(obs_dim, hidden, 1.0),
        "critic.b1": np.zeros(hidden),
        "critic.w2": dense(hidden, 1, 1.0),
        "critic.b2": np.zeros(1),
    }


def policy(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and action probabilities for states ``x`` (batch or single)."""
    h = np.tanh(x @ params["actor.w1"] + params["actor.b1"])
    z = h @ params["actor.w2"] + params["actor.b2"]
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return h, e / e.sum(axis=-1, keepdims=True)


def critic(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and state values (last axis squeezed)."""
    h = np.tanh(x @ params["critic.w1"] + params["critic.b1"])
    return h, (h @ params["critic.w2"] + params["critic.b2"])[..., 0]


def a3c_gradients(
    params: dict[str, np.ndarray],
    states: np.ndarray,
    actions: np.ndarray,
    returns: np.ndarray,
    entropy_coef: float,
    value_coef: float,
) -> dict[str, np.ndarray]:
    """Gradients of the A3C loss, averaged over the rollout, by hand.

    loss = mean(-log pi(a|s) * A - entropy_coef * H(pi(.|s)) + value_coef/2 * (R - V(s))^2)
    with the advantage A = R - V(s) held constant in the policy term.
    """
    n = len(actions)
    h, p = policy(params, states)
    hc, v = critic(params, states)
    adv = returns - v
    logp = np.log(p + 1e-12)
    entropy = -(p * logp).sum(axis=1, keepdims=True)
    # d(-log p_a * A)/dz = (p - onehot) * A;  d(-H)/dz = p * (log p + H)
    dz = p * adv[:, None]
    dz[np.arange(n), actions] -= adv
    dz += entropy_coef * p * (logp + entropy)
    dz /= n
    dh = (dz @ params["actor.w2"].T) * (1.0 - h * h)
    dv = (-value_coef / n) * adv[:, None]  # d(value_coef/2 (v - R)^2)/dv, averaged
    dhc = (dv @ params["critic.w2"].T) * (1.0 - hc * hc)
    return {
        "actor.w1": states.T @ dh,
        "actor.b1": dh.sum(axis=0),
        "actor.w2": h.T @ dz,
        "actor.b2": dz.sum(axis=0),
        "critic.w1": states.T @ dhc,
        "critic.b1": dhc.sum(axis=0),
        "critic.w2": hc.T @ dv,
        "critic.b2": dv.sum(axis=0),
    }


# ---------------------------------------------------------------- the workers


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters shared by every worker (picklable, passed at start)."""

    env: str = "CartPole-v1"
    workers: int = 2
    seed: int = 0
    hidden: int = 128
    rollout: int = 20  # n-step return horizon (A3C's t_max)
    gamma: float = 0.99
    lr: float = 2e-3  # 15/15 seeds solved; ~70k env steps (1e-3 needs ~110k)
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    reward_scale: float = 0.1  # keeps CartPole's values (~10) in tanh-friendly range
    grad_clip: float = 5.0  # global-norm clip; tames the occasional huge advantage


def worker_loop(
    index: int,
    params: dict[str, np.ndarray],
    optimizer: Adam,
    episodes: mp.SimpleQueue,
    stop: np.ndarray,
    step_counts: np.ndarray,
    settings: Settings,
) -> None:
    """Play rollouts and apply gradients to the shared parameters until ``stop[0]``."""
    import gymnasium as gym

    env = gym.make(settings.env, disable_env_checker=True)
    seed = settings.seed * 1000 + index
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    n_actions = int(env.action_space.n)
    obs_dim = int(np.prod(env.observation_space.shape))
    states = np.empty((settings.rollout, obs_dim))
    actions = np.empty(settings.rollout, dtype=np.int64)
    rewards = np.empty(settings.rollout)
    episode_return = 0.0
    steps = 0
    # A3C's thread-specific parameters: every rollout starts from a private copy
    # of the shared ones (theta' <- theta). The per-step forward pass then reads
    # memory no other worker writes (reading the shared arrays at every step
    # makes each core re-fetch the cache lines the others' updates invalidate),
    # and a rollout's gradient is computed against one consistent snapshot.
    local = {k: np.empty_like(v) for k, v in params.items()}
    # The per-step path is the hot loop: local names for the actor arrays, one
    # batch of uniforms per rollout, sampling on a Python list.
    w1, b1, w2, b2 = (local[k] for k in ("actor.w1", "actor.b1", "actor.w2", "actor.b2"))
    last_action = n_actions - 1
    parent = os.getppid()
    while not stop[0] and os.getppid() == parent:  # also stop if the monitor died
        for k, v in params.items():
            np.copyto(local[k], v)
        t = 0
        bootstrap = None
        uniforms = rng.random(settings.rollout).tolist()
        while t < settings.rollout:
            x = np.asarray(obs, dtype=np.float64).reshape(-1)
            z = np.tanh(x @ w1 + b1) @ w2 + b2
            e = np.exp(z - z.max()).tolist()
            u = uniforms[t] * sum(e)
            a = 0
            while a < last_action and u >= e[a]:
                u -= e[a]
                a += 1
            obs, r, terminated, truncated, _ = env.step(a)
            states[t], actions[t], rewards[t] = x, a, r * settings.reward_scale
            t += 1
            steps += 1
            episode_return += float(r)
            if terminated or truncated:
                # A time-limit cut is not a real end: bootstrap from the value there.
                last = np.asarray(obs, dtype=np.float64).reshape(-1)
                bootstrap = 0.0 if terminated else float(critic(local, last)[1])
                episodes.put((index, episode_return, steps))
                episode_return = 0.0
                obs, _ = env.reset()
                break
        if bootstrap is None:
            bootstrap = float(critic(local, np.asarray(obs, dtype=np.float64).reshape(-1))[1])
        returns = np.empty(t)
        acc = bootstrap
        for j in range(t - 1, -1, -1):
            acc = rewards[j] + settings.gamma * acc
            returns[j] = acc
        grads = a3c_gradients(
            local, states[:t], actions[:t], returns, settings.entropy_coef, settings.value_coef
        )
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
        if norm > settings.grad_clip:
            for g in grads.values():
                g *= settings.grad_clip / norm
        optimizer.step(grads)  # Hogwild: no lock around the shared update
        step_counts[index] = steps
    env.close()


# ---------------------------------------------------------------- the monitor


@dataclass
class Result:
    """What one training run produced."""

    solved: bool
    mean100: float
    steps: int
    seconds: float
    threshold: float | None
    returns: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds since start, per episode
    greedy_returns: list[float] = field(default_factory=list)
    greedy_checks: int = 0  # snapshots checked greedily before one passed (or time ran out)


def env_threshold(env_id: str) -> tuple[float | None, int, int]:
    """The env's "solved" reward threshold, observation size and number of actions."""
    import gymnasium as gym

    env = gym.make(env_id, disable_env_checker=True)
    try:
        if not hasattr(env.action_space, "n"):
            raise SystemExit(
                f"--env {env_id}: needs a discrete action space, got {env.action_space}"
            )
        threshold = env.spec.reward_threshold if env.spec is not None else None
        return threshold, int(np.prod(env.observation_space.shape)), int(env.action_space.n)
    finally:
        env.close()


def train(
    settings: Settings,
    max_seconds: float,
    *,
    stop_when_solved: bool = True,
    progress: bool = True,
    start_time: float | None = None,
) -> Result:
    """Run Hogwild A3C; return the learning curve and the final 100-episode mean."""
    t0 = time.monotonic() if start_time is None else start_time
    threshold, obs_dim, n_actions = env_threshold(settings.env)
    params = {
        k: shm.share(v)
        for k, v in init_params(obs_dim, n_actions, settings.hidden, settings.seed).items()
    }
    optimizer = Adam(params, lr=settings.lr).share_memory()
    stop = shm.zeros(1, dtype=np.int8)
    step_counts = shm.zeros(settings.workers, dtype=np.int64)
    # fork starts workers in milliseconds (they inherit numpy and gymnasium);
    # spawn works too, the shared arrays then travel as shared-memory handles.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    episodes = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=worker_loop,
            args=(i, params, optimizer, episodes, stop, step_counts, settings),
            daemon=True,
        )
        for i in range(settings.workers)
    ]
    returns: list[float] = []
    times: list[float] = []
    final: dict[str, np.ndarray] | None = None
    checks, next_check_at = 0, 0
    bar = _progress_bar(progress, settings, threshold)
    try:
        for p in procs:
            p.start()
        while True:
            now = time.monotonic()
            drained = _drain(episodes, returns, times, t0)
            mean100 = float(np.mean(returns[-100:])) if returns else float("nan")
            if bar is not None and drained:
                bar.update(drained)
                bar.set_postfix(mean100=f"{mean100:.1f}", steps=int(step_counts.sum()))
            if (
                stop_when_solved
                and threshold is not None
                and len(returns) >= 100
                and mean100 >= threshold
                and len(returns) >= next_check_at
            ):
                # The sampled policy averages the threshold; the greedy one is
                # not always as good (a Hogwild update can tip an argmax). Check
                # a snapshot greedily on episodes of its own (never the final
                # evaluation's), and stop only when it passes: the workers keep
                # updating the live parameters meanwhile, so the snapshot is
                # what the check saw and what gets evaluated.
                snapshot = {k: np.array(v) for k, v in params.items()}
                check = greedy_evaluate(
                    snapshot, settings.env, GREEDY_EPISODES, _check_seed(settings.seed, checks)
                )
                checks += 1
                if float(np.mean(check)) >= threshold:
                    final = snapshot
                    break
                next_check_at = len(returns) + CHECK_EVERY_EPISODES
            if now - t0 >= max_seconds:
                break
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    f"A3C worker (pid {dead[0].pid}) exited with code {dead[0].exitcode}"
                )
            if not drained:
                time.sleep(0.005)  # episodes arrive every few ms; poll gently
    finally:
        stop[0] = 1
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if bar is not None:
            bar.close()
    seconds = time.monotonic() - t0
    mean100 = float(np.mean(returns[-100:])) if returns else float("nan")
    solved = threshold is not None and len(returns) >= 100 and mean100 >= threshold
    result = Result(
        solved=solved,
        mean100=mean100,
        steps=int(step_counts.sum()),
        seconds=seconds,
        threshold=threshold,
        returns=returns,
        times=times,
        greedy_checks=checks,
    )
    if final is None:  # out of time: the parameters as the workers left them
        final = {k: np.array(v) for k, v in params.items()}
    result.greedy_returns = greedy_evaluate(
        final, settings.env, GREEDY_EPISODES, _evaluation_seed(settings.seed)
    )
    return result


def _drain(episodes: mp.SimpleQueue, returns: list[float], times: list[float], t0: float) -> int:
    n = 0
    while not episodes.empty():
        try:
            _, ret, _ = episodes.get()
        except (EOFError, queue.Empty):
            break
        returns.append(ret)
        times.append(time.monotonic() - t0)
        n += 1
    return n


def _progress_bar(enabled: bool, settings: Settings, threshold: float | None):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        desc=f"A3C {settings.env} x{settings.workers} (target {threshold})",
        unit="ep",
        file=sys.stderr,
        mininterval=0.25,
        disable=None,  # silent when stderr is not a terminal
    )


GREEDY_EPISODES = 20
CHECK_EVERY_EPISODES = 20  # after a failed greedy check, train this many episodes more


def _evaluation_seed(seed: int) -> int:
    """First env seed of the final evaluation: disjoint from every check's."""
    return 10_000 + 100 * seed


def _check_seed(seed: int, check: int) -> int:
    """First env seed of greedy check number ``check``: fresh episodes each time."""
    return 1_000_000 + 100_000 * seed + GREEDY_EPISODES * check


def greedy_evaluate(
    params: dict[str, np.ndarray], env_id: str, episodes: int, first_seed: int
) -> list[float]:
    """Returns of ``episodes`` episodes (env seeds from ``first_seed``) taking the most probable action."""
    import gymnasium as gym

    env = gym.make(env_id, disable_env_checker=True)
    out = []
    for e in range(episodes):
        obs, _ = env.reset(seed=first_seed + e)
        total, done = 0.0, False
        while not done:
            _, p = policy(params, np.asarray(obs, dtype=np.float64).reshape(-1))
            obs, r, terminated, truncated, _ = env.step(int(np.argmax(p)))
            total += float(r)
            done = terminated or truncated
        out.append(total)
    env.close()
    return out


def plot_learning_curve(result: Result, settings: Settings, path: str) -> None:
    """Save episode returns and their running 100-episode mean against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    r = np.asarray(result.returns)
    t = np.asarray(result.times)
    mean = np.array([r[max(0, i - 99) : i + 1].mean() for i in range(len(r))])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, r, ".", ms=2, alpha=0.35, label="episode return")
    ax.plot(t, mean, lw=2, label="mean of last 100")
    if result.threshold is not None:
        ax.axhline(result.threshold, color="k", ls="--", lw=1, label=f"solved ({result.threshold})")
    ax.set_xlabel("wall time since start (s)")
    ax.set_ylabel("return")
    ax.set_title(
        f"Hogwild A3C, {settings.env}, {settings.workers} workers, seed {settings.seed} "
        f"({result.steps} env steps)"
    )
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="CartPole-v1", help="discrete-action gymnasium env id")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="wall-time budget")
    ap.add_argument("--lr", type=float, default=Settings.lr)
    ap.add_argument("--hidden", type=int, default=Settings.hidden)
    ap.add_argument(
        "--plot",
        default=None,
        help="where to save the learning curve PNG (default /tmp/distrib-examples/a3c_<env>.png)",
    )
    ap.add_argument("--no-plot", action="store_true", help="skip the plot")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if args.max_seconds <= 0:
        ap.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        env=args.env, workers=args.workers, seed=args.seed, lr=args.lr, hidden=args.hidden
    )
    result = train(settings, args.max_seconds, progress=not args.no_progress, start_time=T_START)
    greedy = float(np.mean(result.greedy_returns))
    print(
        f"greedy evaluation: mean={greedy:.1f} over {len(result.greedy_returns)} episodes"
        f" (after {result.greedy_checks} greedy check(s) during training)"
    )
    if not args.no_plot:
        path = args.plot or f"/tmp/distrib-examples/a3c_{settings.env}.png"
        plot_learning_curve(result, settings, path)
        print(f"learning curve: {path}")
    status = "solved" if result.solved else "not solved"
    print(
        f"{status}: mean100={result.mean100:.1f} steps={result.steps} seconds={result.seconds:.1f}",
        flush=True,
    )
    ok = result.solved and (result.threshold is None or greedy >= result.threshold)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
