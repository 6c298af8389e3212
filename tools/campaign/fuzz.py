"""``fusefs-campaign --fuzz-image N``: damaged images, fed to fsck and mount.

The base images are made by the campaign's workloads, in-process
(`tools.campaign.fuzzbase`), once per seed; image ``i`` of a run is base
``i // len(KINDS) % len(BASES)`` damaged by kind ``i % len(KINDS)`` with a seed
drawn from ``--seed`` and ``i`` (`tools.campaign.fuzzdamage`), so every image of
a run is known by its number, and a run replays.  Each image is judged by
`tools.campaign.fuzzcheck.check_image` in a worker process (``-j`` of them): a
worker that overruns ``--timeout`` is killed and the image counts as a hang.
About one image in ``--fuzz-fuse-every`` (default 200; drawn by the image's
seed, so every damage kind is sampled) is mounted again through the kernel
(``fusefs mount``), read through it, and its tree compared with the in-process
one.

Every failure leaves a reproducer in ``OUT/repro/``: the damaged image
(gzip-compressed) and a JSON recipe (base, kind, seed, what the damage did,
the outcome), replayed by ``fusefs-campaign --fuzz-replay OUT/repro/N.json``.
The report is ``OUT/fuzz.json`` and ``OUT/fuzz.md``: outcomes per damage kind.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from tools.campaign.fuzzbase import BASE_NAMES, build_base
from tools.campaign.fuzzcheck import FAILURES, OUTCOMES, Verdict, check_image
from tools.campaign.fuzzdamage import KINDS, damage
from tools.campaign.mount import StepTimeout

KIND_NAMES: Final = tuple(KINDS)


@dataclass(frozen=True)
class Job:
    index: int
    base: str
    kind: str
    seed: int


def job_of(index: int, seed: int) -> Job:
    kind = KIND_NAMES[index % len(KIND_NAMES)]
    base = BASE_NAMES[(index // len(KIND_NAMES)) % len(BASE_NAMES)]
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return Job(index, base, kind, int.from_bytes(digest[:4], "little"))


def scratch_dir() -> Path:
    """Scratch space for the image copies: memory when there is some (fsck and
    unmount flush; on tmpfs a flush is free)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


# the workers:


def _worker(conn: multiprocessing.connection.Connection, timeout: float) -> None:
    bases: dict[str, bytes] = {}
    scratch = Path(tempfile.mkdtemp(prefix="fusefs-fuzz-", dir=scratch_dir()))
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            base_path, kind, seed, want_tree = msg
            if base_path not in bases:
                bases[base_path] = Path(base_path).read_bytes()
            image, recipe = damage(bases[base_path], kind, seed)
            verdict = check_image(image, scratch / "img", timeout)
            tree = verdict.mount.tree if (want_tree and verdict.mount) else None
            conn.send((recipe, verdict.to_json(), tree))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Worker:
    """A worker process; killed and replaced when an image overruns."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.timeout), daemon=True)
        self.proc.start()
        child.close()

    def run(
        self, base_path: str, kind: str, seed: int, want_tree: bool
    ) -> tuple[str, dict[str, Any], dict[str, str] | None]:
        try:
            self.conn.send((base_path, kind, seed, want_tree))
        except OSError as e:  # the worker died between two images
            self.restart()
            return "", {"outcome": "traceback", "detail": f"worker gone: {e}"}, None
        # Three mounts and three fscks, each under ``timeout``; the worker's own
        # watchdog (trio.fail_after) catches a stuck await, this a stuck loop.
        if self.conn.poll(4 * self.timeout + 30):
            try:
                result: tuple[str, dict[str, Any], dict[str, str] | None] = self.conn.recv()
                return result
            except EOFError:
                detail = f"the worker died (exit {self.proc.exitcode})"
                self.restart()
                return "", {"outcome": "traceback", "detail": detail}, None
        self.restart()
        return "", {"outcome": "hang", "detail": f"overran {4 * self.timeout + 30:.0f} s"}, None

    def restart(self) -> None:
        self.proc.kill()
        self.proc.join()
        self._start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# the FUSE sample:


def fuse_tree(image: bytes, workdir: Path, timeout: float) -> tuple[str, dict[str, str]]:
    """Mount ``image`` through the kernel (``fusefs mount``), read everything,
    unmount: the refusal message, or the tree as `fuzzcheck` digests it."""
    from tools.campaign.fuzzcheck import CHUNK, READ_CAP
    from tools.campaign.mount import Image

    img = Image(workdir, "0", timeout=timeout)
    workdir.mkdir(parents=True, exist_ok=True)
    img.mountpoint.mkdir(exist_ok=True)
    img.image.write_bytes(image)
    mounted = img.mount()
    if not mounted.ok:
        img.cleanup()
        return mounted.message or "refused", {}
    tree: dict[str, str] = {}
    try:
        root = img.mountpoint
        stack = [root]
        seen: set[int] = set()
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError as e:
                # The kernel refuses some names a damaged directory may hold
                # ("a/b"): EIO for the whole readdir.
                tree["/" + os.path.relpath(d, root)] = f"error {e.errno}"
                continue
            for entry in entries:
                rel = "/" + os.path.relpath(entry.path, root)
                try:
                    st = entry.stat(follow_symlinks=False)
                    digest = f"mode {st.st_mode:o}"
                    for x in sorted(os.listxattr(entry.path, follow_symlinks=False)):
                        value = os.getxattr(entry.path, x, follow_symlinks=False)
                        digest += f" {os.fsencode(x)!r}={hashlib.sha256(value).hexdigest()[:16]}"
                    if entry.is_dir(follow_symlinks=False):
                        if st.st_ino in seen:
                            continue
                        seen.add(st.st_ino)
                        stack.append(Path(entry.path))
                    elif entry.is_symlink():
                        digest += f" -> {os.fsencode(os.readlink(entry.path))!r}"
                    else:
                        h = hashlib.sha256()
                        with open(entry.path, "rb", buffering=0) as f:
                            size = st.st_size
                            spans = [(0, min(size, READ_CAP))]
                            if size > READ_CAP:
                                spans.append((max(READ_CAP, size - 4096), 4096))
                            for start, length in spans:
                                pos = start
                                while pos < min(start + length, size):
                                    chunk = os.pread(
                                        f.fileno(), min(CHUNK, start + length - pos), pos
                                    )
                                    if not chunk:
                                        break
                                    h.update(chunk)
                                    pos += len(chunk)
                        digest += f" size {st.st_size} data {h.hexdigest()}"
                    tree[rel] = digest
                except OSError as e:
                    tree[rel] = f"error {e.errno}"
    finally:
        img.umount()
        img.cleanup()
    return "", tree


def compare_trees(inproc: dict[str, str], kernel: dict[str, str]) -> str:
    """The first difference between what the two mounts served ('' if none)."""
    for path in sorted(set(inproc) | set(kernel)):
        a, b = inproc.get(path), kernel.get(path)
        if b is not None and b.startswith("error"):
            continue  # the kernel refusing something (a directory loop) is no disagreement
        if a is not None and b is not None and a != b:
            return f"{path}: in-process {a[:80]!r}, through the kernel {b[:80]!r}"
        if a is None and b is not None:
            return f"{path}: only through the kernel"
    return ""


# the campaign:


@dataclass
class Result:
    job: Job
    recipe: str
    verdict: dict[str, Any]
    fuse: str = ""  # the FUSE sample's note

    @property
    def outcome(self) -> str:
        return str(self.verdict["outcome"])

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.job.index,
            "base": self.job.base,
            "kind": self.job.kind,
            "seed": self.job.seed,
            "recipe": self.recipe,
            "fuse": self.fuse,
            **self.verdict,
        }


def save_reproducer(out: Path, base_path: Path, result: Result, argv: Sequence[str]) -> Path:
    repro = out / "repro"
    repro.mkdir(parents=True, exist_ok=True)
    job = result.job
    image, _recipe = damage(base_path.read_bytes(), job.kind, job.seed)
    name = f"{job.index:05d}-{job.kind}"
    gz = repro / f"{name}.img.gz"
    gz.write_bytes(gzip.compress(image, 6))
    doc = {
        **result.to_json(),
        "image": gz.name,
        "base_image": os.fspath(base_path),
        "campaign": list(argv),
        "replay": f"python -m tools.campaign --fuzz-replay {repro / (name + '.json')}",
    }
    path = repro / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def build_bases(out: Path, seed: int, quiet: bool) -> dict[str, Path]:
    bases = out / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in BASE_NAMES:
        path = bases / f"{name}-seed{seed}.img"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            build_base(name, tmp, seed)
            tmp.rename(path)
        paths[name] = path
        if not quiet:
            print(f"base image {name}: {path}", file=sys.stderr)
    return paths


def run_fuzz(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now().isoformat(timespec="seconds")
    t0 = time.monotonic()
    bases = build_bases(out, args.seed, args.quiet)
    jobs = [job_of(i, args.seed) for i in range(args.fuzz_image)]
    results: list[Result] = []
    lock = threading.Lock()
    pending = iter(jobs)
    deadline = None if args.budget is None else t0 + args.budget
    every = args.fuzz_fuse_every
    fuse_mounts = 0

    def drive() -> None:
        nonlocal fuse_mounts
        worker = Worker(args.timeout)
        try:
            while True:
                with lock:
                    job = next(pending, None)
                if job is None or (deadline is not None and time.monotonic() > deadline):
                    return
                sample = every > 0 and job.seed % every == 0
                recipe, verdict, tree = worker.run(
                    os.fspath(bases[job.base]), job.kind, job.seed, sample
                )
                result = Result(job, recipe, verdict)
                if sample and result.outcome not in FAILURES:
                    try:
                        result.fuse = fuse_check(
                            bases[job.base], job, tree, result, out, args.timeout
                        )
                    except StepTimeout as e:
                        result.verdict.update(outcome="hang", detail=f"through the kernel: {e}")
                    except Exception as e:
                        result.verdict.update(
                            outcome="traceback",
                            detail=f"through the kernel: {type(e).__name__}: {e}",
                            traceback=traceback.format_exc(),
                        )
                    with lock:
                        fuse_mounts += 1
                with lock:
                    results.append(result)
                    done = len(results)
                if result.outcome in FAILURES:
                    save_reproducer(out, bases[job.base], result, args.argv)
                if not args.quiet and (result.outcome in FAILURES or done % 100 == 0):
                    print(
                        f"[{done}/{len(jobs)}] #{job.index} {job.base} {job.kind}: "
                        f"{result.outcome} {result.verdict.get('detail', '')[:160]}",
                        file=sys.stderr,
                    )
        finally:
            worker.close()

    threads = [threading.Thread(target=drive) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.sort(key=lambda r: r.job.index)
    doc = report(results, args, started, time.monotonic() - t0, fuse_mounts)
    (out / "fuzz.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "fuzz.md").write_text(render_markdown(doc))
    return doc


def fuse_check(
    base: Path, job: Job, tree: dict[str, str] | None, result: Result, out: Path, timeout: float
) -> str:
    """The FUSE sample: the same image through the kernel; a disagreement fails."""
    image, _ = damage(base.read_bytes(), job.kind, job.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-fuse-", dir=out))
    try:
        refused, kernel = fuse_tree(image, work, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    in_refused = result.verdict.get("mount_refused", "")
    if bool(refused) != bool(in_refused):
        note = f"through the kernel: {refused or 'mounted'}; in-process: {in_refused or 'mounted'}"
        result.verdict.update(outcome="fuse differs", detail=note)
        return note
    if tree is not None and not refused:
        diff = compare_trees(tree, kernel)
        if diff:
            result.verdict.update(outcome="fuse differs", detail=diff)
            return diff
        return f"same through the kernel ({len(kernel)} entries)"
    return f"refused through the kernel too: {refused}"


ALL_OUTCOMES: Final = (*OUTCOMES, "fuse differs")
FAILING: Final = (*FAILURES, "fuse differs")


def report(
    results: list[Result], args: argparse.Namespace, started: str, seconds: float, fuse: int
) -> dict[str, Any]:
    matrix = {k: dict.fromkeys(ALL_OUTCOMES, 0) for k in KIND_NAMES}
    for r in results:
        matrix[r.job.kind][r.outcome] = matrix[r.job.kind].get(r.outcome, 0) + 1
    totals = Counter(r.outcome for r in results)
    per_base = {b: dict(Counter(r.outcome for r in results if r.job.base == b)) for b in BASE_NAMES}
    return {
        "started": started,
        "seconds": round(seconds, 1),
        "argv": list(args.argv),
        "seed": args.seed,
        "images": len(results),
        "requested": args.fuzz_image,
        "counts": {o: totals.get(o, 0) for o in ALL_OUTCOMES},
        "matrix": matrix,
        "per_base": per_base,
        "fuse_sample": {
            "every": args.fuzz_fuse_every,
            "mounts": fuse,
            "results": [
                {"index": r.job.index, "kind": r.job.kind, "note": r.fuse}
                for r in results
                if r.fuse
            ],
        },
        "failures": [r.to_json() for r in results if r.outcome in FAILING],
    }


def render_markdown(doc: dict[str, Any]) -> str:
    cols = [o for o in ALL_OUTCOMES if o in doc["counts"]]
    lines = [
        "# fusefs image fuzzing",
        "",
        f"Started {doc['started']}, {doc['seconds']:.0f} s; seed {doc['seed']}; "
        f"{doc['images']} of {doc['requested']} images.",
        f"Command: `fusefs-campaign {' '.join(doc['argv'])}`",
        "",
        "| damage | " + " | ".join(cols) + " | total |",
        "| --- |" + " ---: |" * (len(cols) + 1),
    ]
    for kind, counts in doc["matrix"].items():
        cells = [
            f"**{counts.get(c, 0)}**" if c in FAILING and counts.get(c) else str(counts.get(c, 0))
            for c in cols
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {sum(counts.values())} |")
    total = doc["counts"]
    lines.append(
        "| **total** | " + " | ".join(str(total[c]) for c in cols) + f" | {doc['images']} |"
    )
    fs = doc["fuse_sample"]
    lines += ["", f"Through the kernel: {fs['mounts']} image(s), one in {fs['every']}."]
    for r in fs["results"]:
        lines.append(f"- #{r['index']} {r['kind']}: {r['note']}")
    if doc["failures"]:
        lines += ["", "## Failures", ""]
        for f in doc["failures"]:
            lines += [
                f"### #{f['index']} {f['base']} {f['kind']}: {f['outcome']}",
                "",
                f"Damage: {f['recipe']}",
                "",
                f"{f['detail']}",
                "",
                "```sh",
                f"python -m tools.campaign --fuzz-replay repro/{f['index']:05d}-{f['kind']}.json",
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def summary(doc: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in doc["counts"].items() if v)
    out = [f"image fuzzing: {doc['images']} image(s): {counts}"]
    for f in doc["failures"][:20]:
        out.append(f"  {f['outcome']}: #{f['index']} {f['base']} {f['kind']}: {f['detail'][:200]}")
    return out


def replay(path: Path, timeout: float) -> int:
    """Judge a reproducer's image again; print the verdict.  Exit 1 if it fails."""
    doc = json.loads(path.read_text())
    image = gzip.decompress((path.parent / doc["image"]).read_bytes())
    print(
        f"replaying #{doc['index']} {doc['base']} {doc['kind']} seed {doc['seed']}: {doc['recipe']}"
    )
    work = Path(tempfile.mkdtemp(prefix="fusefs-fuzz-replay-", dir=scratch_dir()))
    verdict: Verdict = check_image(image, work / "img", timeout)
    print(f"outcome: {verdict.outcome}" + (f": {verdict.detail}" if verdict.detail else ""))
    if verdict.traceback:
        print(verdict.traceback, end="")
    return 1 if verdict.outcome in FAILURES else 0


# the campaign's command line:


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image fuzzing (docs/campaigns.md)")
    g.add_argument("--fuzz-image", type=int, default=0, metavar="N", help="fuzz N damaged images")
    g.add_argument(
        "--fuzz-replay", metavar="FILE", help="judge a fuzzing reproducer (OUT/repro/*.json) again"
    )
    g.add_argument(
        "--fuzz-fuse-every",
        type=int,
        default=200,
        metavar="K",
        help="mount one image in K through the kernel too (0: none; default 200)",
    )


def main(args: argparse.Namespace) -> int:
    if args.fuzz_replay:
        return replay(Path(args.fuzz_replay), args.timeout)
    doc = run_fuzz(args)
    for line in summary(doc):
        print(line)
    out = Path(args.out).resolve()
    print(f"reports: {out / 'fuzz.md'} {out / 'fuzz.json'}")
    return 1 if doc["failures"] else 0


__all__ = ["Job", "add_arguments", "job_of", "main", "replay", "run_fuzz"]
