"""A local stand-in for GitHub Actions, as far as the recipes under examples/ci/ need.

`workflow_problems` checks a workflow against the structure GitHub Actions
requires (a trigger, ``jobs``, each job with ``runs-on`` and ``steps``, each
step with exactly one of ``uses`` and ``run``, ``needs`` naming jobs that exist,
``strategy.matrix`` a mapping of lists).  `run_workflow` runs it: the jobs in
``needs`` order, a matrix job once per combination, each in a workspace of its
own (separate runners share nothing but artifacts), each ``run`` step with
``bash --noprofile --norc -eo pipefail`` as Actions does, after substituting the
``${{ }}`` expressions it knows (``matrix.*``, ``strategy.job-total``,
``strategy.job-index``, ``inputs.*``, ``env.*``, ``a || 'b'``, ``always()``,
``!cancelled()``); an expression it does not know is an error, never an empty
string.  ``actions/upload-artifact`` and ``actions/download-artifact`` copy
into and out of a local artifact store (a pattern download puts each artifact in
a directory of its name, as v4 does); ``actions/checkout`` and the steps whose
id is in ``skip_ids`` (the installation: this checkout's environment stands in
for it) do nothing.  Any other action is an error.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


class WorkflowError(Exception):
    pass


def workflow_problems(doc: Any) -> list[str]:
    """What keeps ``doc`` from being a workflow GitHub Actions would run."""
    if not isinstance(doc, dict):
        return ["not a mapping"]
    out = []
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean true.
    if "on" not in doc and True not in doc:
        out.append("no trigger (on:)")
    jobs = doc.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        return [*out, "no jobs"]
    for name, job in jobs.items():
        if not isinstance(job, dict):
            out.append(f"job {name}: not a mapping")
            continue
        if "runs-on" not in job:
            out.append(f"job {name}: no runs-on")
        for need in _needs(job):
            if need not in jobs:
                out.append(f"job {name}: needs unknown job {need}")
        matrix = job.get("strategy", {}).get("matrix")
        if matrix is not None and not (
            isinstance(matrix, dict) and all(isinstance(v, list) and v for v in matrix.values())
        ):
            out.append(f"job {name}: strategy.matrix is not a mapping of lists")
        steps = job.get("steps")
        if not isinstance(steps, list) or not steps:
            out.append(f"job {name}: no steps")
            continue
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or ("uses" in step) == ("run" in step):
                out.append(f"job {name} step {i + 1}: needs exactly one of uses and run")
    return out


@dataclass
class JobRun:
    name: str
    workspace: Path
    ok: bool = True
    steps: list[tuple[str, int]] = field(default_factory=list)  # (step, exit status)
    output: str = ""


@dataclass
class _Context:
    inputs: Mapping[str, str]
    env: dict[str, str]
    matrix: Mapping[str, Any] = field(default_factory=dict)
    job_total: int = 1
    job_index: int = 0


def _value(term: str, ctx: _Context) -> str:
    term = term.strip()
    if term in ("always()", "!cancelled()"):
        return "true"
    if len(term) >= 2 and term[0] == term[-1] == "'":
        return term[1:-1]
    head, _, key = term.partition(".")
    if head == "matrix" and key in ctx.matrix:
        return str(ctx.matrix[key])
    if head == "inputs":
        return ctx.inputs.get(key, "")
    if head == "env" and key in ctx.env:
        return ctx.env[key]
    if term == "strategy.job-total":
        return str(ctx.job_total)
    if term == "strategy.job-index":
        return str(ctx.job_index)
    raise WorkflowError(f"the shim cannot evaluate ${{{{ {term} }}}}")


def _evaluate(expr: str, ctx: _Context) -> str:
    for term in expr.split("||"):
        value = _value(term, ctx)
        if value:
            return value
    return ""


def expand(text: str, ctx: _Context) -> str:
    return _EXPR.sub(lambda m: _evaluate(m.group(1), ctx), text)


def _condition(step_or_job: Mapping[str, Any], ctx: _Context, failed: bool) -> bool:
    cond = step_or_job.get("if")
    if cond is None:
        return not failed
    text = str(cond)
    value = expand(text, ctx) if "${{" in text else _evaluate(text, ctx)
    return value == "true"


def _upload(with_: Mapping[str, str], workspace: Path, store: Path) -> None:
    src = workspace / with_["path"]
    dest = store / with_["name"]
    if dest.exists():
        raise WorkflowError(f"artifact {with_['name']} uploaded twice")
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        dest.mkdir(parents=True)
        shutil.copy2(src, dest / src.name)


def _download(with_: Mapping[str, str], workspace: Path, store: Path) -> None:
    dest = workspace / with_.get("path", ".")
    if "name" in with_:
        shutil.copytree(store / with_["name"], dest, dirs_exist_ok=True)
        return
    for artifact in sorted(store.iterdir()):
        if fnmatch.fnmatchcase(artifact.name, with_["pattern"]):
            shutil.copytree(artifact, dest / artifact.name)


def _run_job(
    name: str,
    job: Mapping[str, Any],
    ctx: _Context,
    workspace: Path,
    store: Path,
    skip_ids: Sequence[str],
    timeout: float,
) -> JobRun:
    workspace.mkdir(parents=True)
    result = JobRun(name, workspace)
    env = {**ctx.env, **{k: expand(str(v), ctx) for k, v in job.get("env", {}).items()}}
    for i, step in enumerate(job["steps"]):
        label = expand(str(step.get("name", step.get("uses", step.get("id", i + 1)))), ctx)
        if step.get("id") in skip_ids or not _condition(step, ctx, not result.ok):
            continue
        with_ = {k: expand(str(v), ctx) for k, v in step.get("with", {}).items()}
        uses = str(step.get("uses", ""))
        if uses.startswith("actions/checkout@"):
            continue
        if uses.startswith("actions/upload-artifact@"):
            _upload(with_, workspace, store)
            continue
        if uses.startswith("actions/download-artifact@"):
            _download(with_, workspace, store)
            continue
        if uses:
            raise WorkflowError(f"the shim does not run {uses}")
        step_ctx = _Context(ctx.inputs, env, ctx.matrix, ctx.job_total, ctx.job_index)
        step_env = {**env, **{k: expand(str(v), step_ctx) for k, v in step.get("env", {}).items()}}
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", expand(step["run"], ctx)],
            cwd=workspace,
            env={**os.environ, **step_env, "GITHUB_WORKSPACE": str(workspace), "CI": "true"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result.output += f"$ {label}\n{done.stdout}{done.stderr}"
        result.steps.append((label, done.returncode))
        result.ok &= done.returncode == 0
    return result


def _needs(job: Mapping[str, Any]) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def _order(jobs: Mapping[str, Any]) -> list[str]:
    done: list[str] = []
    while len(done) < len(jobs):
        ready = [
            n
            for n, j in jobs.items()
            if n not in done
            and all(
                d in done
                for d in ([j["needs"]] if isinstance(j.get("needs"), str) else j.get("needs", []))
            )
        ]
        if not ready:
            raise WorkflowError("needs form a cycle")
        done += ready
    return done


def run_workflow(
    doc: Mapping[str, Any],
    workdir: Path,
    *,
    inputs: Mapping[str, str] | None = None,
    matrix: Mapping[str, Mapping[str, list[Any]]] | None = None,
    skip_ids: Sequence[str] = ("setup",),
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, list[JobRun]]:
    """Run ``doc``'s jobs under ``workdir``; ``matrix`` replaces a job's
    ``strategy.matrix``; ``env`` is added to every step's environment (PATH,
    for the commands to run this checkout's code).  Returns each job's runs."""
    store = workdir / "artifacts"
    store.mkdir(parents=True)
    base = dict(env or {})
    wf_ctx = _Context(inputs or {}, base)
    base.update({k: expand(str(v), wf_ctx) for k, v in doc.get("env", {}).items()})
    results: dict[str, list[JobRun]] = {}
    for name in _order(doc["jobs"]):
        job = doc["jobs"][name]
        needs = job.get("needs", [])
        failed = any(
            not r.ok for n in ([needs] if isinstance(needs, str) else needs) for r in results[n]
        )
        grid = (matrix or {}).get(name) or job.get("strategy", {}).get("matrix") or {}
        combos = [
            dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
        ]
        results[name] = []
        for index, combo in enumerate(combos or [{}]):
            ctx = _Context(inputs or {}, base, combo, max(1, len(combos)), index)
            if not _condition(job, ctx, failed):
                continue
            suffix = "-".join(str(v) for v in combo.values())
            workspace = workdir / (f"{name}-{suffix}" if suffix else name)
            results[name].append(_run_job(name, job, ctx, workspace, store, skip_ids, timeout))
    return results


__all__ = ["JobRun", "WorkflowError", "expand", "run_workflow", "workflow_problems"]
