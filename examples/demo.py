"""The ckpt demo: a Flax run and a Lightning run, each killed mid-training and started again.

    make demo                         # or: python examples/demo.py [--dir runs/demo] [--no-reference]

For each of examples/flax_train.py and examples/lightning_train.py:

1. start the training; as soon as a checkpoint past 40% of the run is committed, SIGKILL it
   (no handler runs, no final save: as if the machine died);
2. ``ckpt ls`` the directory: the committed steps with their loss, and the temporary directory of
   a save the kill may have interrupted, which is never mistaken for a checkpoint;
3. run the same command again: it resumes from the latest committed step (the steps before it are
   not written again) and trains to the end;
4. train once more without a kill (skip with ``--no-reference``);
5. print the loss saved with each step of both runs side by side, check that the final values of
   the two runs are the same bit for bit, and ``ckpt ls`` the directory.

It takes one to two minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import ckpt
from ckpt.path import step as step_lib

EXAMPLES_DIR = Path(__file__).resolve().parent
RUN_TIMEOUT_SECS = 600


@dataclasses.dataclass(frozen=True)
class Example:
    """One training script and how the demo drives it."""

    title: str
    script: str
    args: tuple[str, ...]          # everything but the directory option
    directory_option: str
    last_step: int
    compared: str                  # the checkpointable compared with the uninterrupted run

    def command(self, directory: Path) -> list[str]:
        return [sys.executable, str(EXAMPLES_DIR / self.script), self.directory_option, str(directory), *self.args]


EXAMPLES = (
    Example("Flax: a Linen TrainState in a hand-written loop (CheckpointHook, restore_train_state)",
            "flax_train.py", ("--steps", "2000", "--save-every", "200"), "--directory", 2000, "state"),
    Example("PyTorch Lightning: Trainer(callbacks=[CheckpointCallback(...)])",
            "lightning_train.py", ("--max-steps", "240", "--save-every", "20", "--keep", "100"), "--dir", 240, "model"),
)


def committed_steps(directory: Path) -> list[int]:
    """The committed steps in ``directory``: a step directory gets its name only once it is complete."""
    names = os.listdir(directory) if directory.is_dir() else []
    return sorted(step_lib.find_steps(names, step_lib.standard_name_format()))


def _echo(stream: Any) -> None:
    for line in stream:
        if not line.startswith("\N{ELECTRIC LIGHT BULB}"):  # Lightning's advertisement for its logger
            print("    | " + line.rstrip(), flush=True)


def run(command: list[str], *, kill_at_step: int | None = None, directory: Path | None = None) -> int | None:
    """Runs ``command``, echoing its output. With ``kill_at_step``, SIGKILLs it as soon as a step
    >= ``kill_at_step`` is committed in ``directory``; returns the latest committed step then."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    echo = threading.Thread(target=_echo, args=(proc.stdout,), daemon=True)
    echo.start()
    deadline = time.monotonic() + RUN_TIMEOUT_SECS
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_at_step is not None and any(s >= kill_at_step for s in committed_steps(directory)):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                echo.join(timeout=5)
                print(f"    X  SIGKILL (step {kill_at_step} or later is committed)", flush=True)
                return committed_steps(directory)[-1]
            time.sleep(0.01)
        if proc.poll() is None:
            raise SystemExit(f"demo: {command[1]} ran longer than {RUN_TIMEOUT_SECS} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    echo.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"demo: {' '.join(command)} failed with exit status {proc.returncode}")
    if kill_at_step is not None:
        raise SystemExit(f"demo: {command[1]} finished before step {kill_at_step} was committed; "
                         "nothing was killed (is this machine much faster? raise the number of steps)")
    return None


def ckpt_ls(directory: Path) -> None:
    """Prints ``ckpt ls DIRECTORY`` as a user would type it."""
    print(f"\n  $ ckpt ls {directory}", flush=True)
    ckpt_command = Path(sys.executable).with_name("ckpt")
    command = [str(ckpt_command)] if ckpt_command.exists() else [sys.executable, "-m", "ckpt.cli"]
    listing = subprocess.run(command + ["ls", str(directory)], capture_output=True, text=True, timeout=120)
    print("\n".join("    " + line for line in (listing.stdout + listing.stderr).splitlines()), flush=True)


def history(root: Path) -> dict[int, tuple[int, Any]]:
    """Each committed step of ``root`` with its commit time (ns) and the metrics saved with it."""
    out = {}
    for step in committed_steps(root):
        info = ckpt.checkpointables_metadata(root / str(step))
        out[step] = (info.commit_timestamp_nsecs, info.metrics)
    return out


def _metric(metrics: Any) -> str:
    if isinstance(metrics, dict) and len(metrics) == 1:
        (value,) = metrics.values()
        return f"{value:.6f}" if isinstance(value, float) else str(value)
    return str(metrics)


def print_losses(resumed: dict, reference: dict | None, killed_after: int) -> bool:
    """The metrics of every step, next to those of the uninterrupted run; whether all of them agree."""
    first = next(iter(resumed.values()))[1]
    name = next(iter(first)) if isinstance(first, dict) and len(first) == 1 else "metrics"
    headers = ["step", f"{name}, killed+resumed", *([f"{name}, never killed"] if reference else [])]
    widths = [6] + [max(len(h) for h in headers[1:])] * (len(headers) - 1)
    print("\n    " + "  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    agree = True
    for step, (_, metrics) in resumed.items():
        cells = [str(step), _metric(metrics)]
        if reference is not None:
            other = reference.get(step, (None, None))[1]
            agree &= other == metrics
            cells.append(_metric(other))
        note = "   <- the last checkpoint before SIGKILL" if step == killed_after else ""
        print("    " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)) + note)
    return agree


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _raw(leaf: Any) -> Any:
    """A leaf as comparable bytes (a typed JAX PRNG key as its key data); Python scalars as they are."""
    if not hasattr(leaf, "dtype"):
        return leaf
    if "key<" in str(leaf.dtype):
        import jax

        leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    return (array.dtype.str, array.shape, array.tobytes())


def same_values(resumed_dir: Path, reference_dir: Path, name: str) -> tuple[bool, int]:
    """Whether the latest steps of the two roots hold bit-identical ``name`` trees; and the leaf count."""
    trees = [ckpt.load_checkpointables(root / str(committed_steps(root)[-1]), {name: None})[name]
             for root in (resumed_dir, reference_dir)]
    leaves = [[_raw(leaf) for leaf in _leaves(tree)] for tree in trees]
    return leaves[0] == leaves[1], len(leaves[0])


def demo(example: Example, root: Path, *, reference: bool) -> bool:
    """Kill, list, resume, compare, list; True when the resumed run continued as it should."""
    directory = root / Path(example.script).stem
    print(f"\n=== {example.title}\n", flush=True)
    kill_at = int(example.last_step * 0.4)
    print(f"  1. train to step {example.last_step}; SIGKILL once a checkpoint >= step {kill_at} is committed",
          flush=True)
    killed_after = run(example.command(directory), kill_at_step=kill_at, directory=directory)
    before = history(directory)
    ckpt_ls(directory)
    print(f"\n  2. the same command again: it resumes from step {killed_after}, the latest committed one",
          flush=True)
    run(example.command(directory))
    after = history(directory)
    rewritten = [step for step, (commit, _) in before.items() if after.get(step, (None,))[0] != commit]
    if rewritten:
        print(f"\n  => FAILED: the second run did not resume; it wrote steps {rewritten} again", flush=True)
        return False
    reference_history, same, count = None, True, 0
    if reference:
        reference_dir = root / (directory.name + "-uninterrupted")
        print(f"\n  3. the same training in {reference_dir}, never killed, for comparison", flush=True)
        run(example.command(reference_dir))
        reference_history = history(reference_dir)
        same, count = same_values(directory, reference_dir, example.compared)
    print("\n  The loss saved with each checkpoint continues across the kill:", flush=True)
    agree = print_losses(after, reference_history, killed_after)
    if reference:
        print(f"\n  => metrics at every step {'agree' if agree else 'DIFFER'}; the final {example.compared!r} is "
              f"{'identical' if same else 'DIFFERENT'} to the uninterrupted run's ({count} leaves, bit for bit)",
              flush=True)
    ckpt_ls(directory)
    return agree and same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/demo"), help="where the runs go (emptied first)")
    parser.add_argument("--no-reference", action="store_true", help="skip the uninterrupted runs")
    parser.add_argument("--only", choices=[Path(e.script).stem for e in EXAMPLES], help="run one example")
    args = parser.parse_args(argv)
    start = time.monotonic()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    ok = all([demo(e, args.dir, reference=not args.no_reference) for e in EXAMPLES
              if args.only in (None, Path(e.script).stem)])
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; the runs are in {args.dir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
