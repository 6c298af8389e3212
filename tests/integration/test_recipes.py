"""The sharding recipes under examples/: each parses and has the structure its
scheduler requires, and two of them run here.

The GitHub Actions workflow runs through a local shim (actions_shim.py): its
plan job, its matrix job for 2 shards and its merge job, each step's commands
as written, with a small campaign given as the workflow's input; the merged
report must hold every run of the plan, in its order (that shards merge to
the unsharded run is test_campaign_shards.py's).  The Slurm
script runs with a stand-in ``sbatch`` that runs each submission at once (an
array as one run per task, with the task's variables).  The Kubernetes manifests
are checked for the Indexed Job's fields and a shard count that agrees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.actions_shim import WorkflowError, run_workflow, workflow_problems
from tools.campaign.report import outcome_table

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "ci" / "campaign-matrix.yml"
K8S = ROOT / "examples" / "k8s" / "campaign-job.yaml"
SLURM = ROOT / "examples" / "slurm" / "campaign.sbatch"

# Two sites whose outcomes are fixed (a device write error the workload sees:
# clean; a site on a path it never takes: not reached) and three power cuts.
SMALL_CAMPAIGN = (
    "--name blockdev_write --name direct_read_buffer --workload meta --ops 24 --cycles 1 "
    "--power-cut 3"
)


def _commands(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``fusefs-campaign`` runs this checkout's code, as
    the recipes' setup steps arrange with the checkout's .venv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "fusefs-campaign"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tools.campaign "$@"\n')
    script.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_ci_workflow_has_the_structure_actions_requires() -> None:
    doc = _load(WORKFLOW)
    assert workflow_problems(doc) == []
    jobs = doc["jobs"]
    assert set(jobs) == {"plan", "shard", "merge"}
    assert jobs["shard"]["needs"] == "plan" and jobs["merge"]["needs"] == "shard"  # noqa: PT018
    matrix = jobs["shard"]["strategy"]["matrix"]
    assert matrix["shard"] == list(range(1, len(matrix["shard"]) + 1))  # K from 1
    runs = " ".join(s.get("run", "") for s in jobs["shard"]["steps"])
    assert "--shard ${{ matrix.shard }}/${{ strategy.job-total }}" in runs
    assert "fusefs-campaign merge" in " ".join(s.get("run", "") for s in jobs["merge"]["steps"])


def test_shim_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    bad = {
        "on": "push",
        "jobs": {"a": {"runs-on": "x", "steps": [{"run": "echo ${{ github.sha }}"}]}},
    }
    with pytest.raises(WorkflowError, match="cannot evaluate"):
        run_workflow(bad, tmp_path)
    assert workflow_problems({"on": "push", "jobs": {"a": {"steps": [{"uses": "x", "run": "y"}]}}})


def test_k8s_indexed_job() -> None:
    docs = list(yaml.safe_load_all(K8S.read_text()))
    kinds = [(d["kind"], d["metadata"]["labels"]["step"]) for d in docs]
    assert kinds == [
        ("PersistentVolumeClaim", "storage"),
        ("Job", "plan"),
        ("Job", "shards"),
        ("Job", "merge"),
    ]
    shards = docs[2]
    spec = shards["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["SHARDS"]) == spec["completions"] == spec["parallelism"]
    script = " ".join(container["args"])
    assert "K=$((JOB_COMPLETION_INDEX + 1))" in script
    assert '--shard "$K/$SHARDS"' in script
    assert "--plan /results/plan/plan.json" in script
    for doc in docs[1:]:
        pod = doc["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "fusefs-campaign"


@pytest.mark.mount
def test_ci_matrix_recipe_runs_and_merges_to_the_single_run(tmp_path: Path) -> None:
    env = _commands(tmp_path)
    results = run_workflow(
        _load(WORKFLOW),
        tmp_path / "actions",
        inputs={"campaign": SMALL_CAMPAIGN},
        matrix={"shard": {"shard": [1, 2]}},
        env=env,
    )
    for name, runs in results.items():
        for run in runs:
            assert run.ok, f"job {name} failed:\n{run.output}"
    assert [len(results[n]) for n in ("plan", "shard", "merge")] == [1, 2, 1]
    (merge,) = results["merge"]
    merged = json.loads((merge.workspace / "merged" / "matrix.json").read_text())
    assert merged["merged"]["count"] == 2
    plan = json.loads((results["plan"][0].workspace / "plan" / "plan.json").read_text())
    assert merged["plan_id"] == plan["plan_id"]
    table = outcome_table(merged)
    assert [f"{r[1]} x {r[2]}" for r in table[:2]] == plan["runs"][:2]
    assert [f"{r[1]} {r[2]}" for r in table[2:]] == plan["runs"][2:]
    assert [r[3] for r in table[:2]] == ["clean", "not reached"]
    assert len(table) == 5
    assert not [r for r in table if r[3] not in ("clean", "not reached")], table


_FAKE_SBATCH = """\
    #!{python}
    # A stand-in for sbatch: runs the script at once (each task of an --array in
    # turn, with SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT), honours
    # --export=ALL,K=V,... and ignores the rest; prints a job id like --parsable.
    import os, subprocess, sys
    env, tasks, args = dict(os.environ), [None], sys.argv[1:]
    while args[0].startswith("--"):
        opt, _, value = args.pop(0).partition("=")
        if opt == "--array":
            lo, hi = map(int, value.split("-"))
            tasks = list(range(lo, hi + 1))
        elif opt == "--export":
            env.update(kv.split("=", 1) for kv in value.split(",")[1:])
    for task in tasks:
        run_env = dict(env)
        if task is not None:
            run_env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(len(tasks)))
        with open(os.environ["SBATCH_LOG"], "a") as log:
            subprocess.run(["bash", *args], env=run_env, stdout=log, stderr=log, check=True)
    print(4242)
"""


@pytest.mark.mount
def test_slurm_recipe_runs_with_a_stand_in_sbatch(tmp_path: Path) -> None:
    env = _commands(tmp_path)
    sbatch = Path(env["PATH"].split(":")[0]) / "sbatch"
    sbatch.write_text(textwrap.dedent(_FAKE_SBATCH).format(python=sys.executable))
    sbatch.chmod(0o755)
    out = tmp_path / "campaign"
    log = tmp_path / "sbatch.log"
    done = subprocess.run(
        ["bash", str(SLURM)],
        env={
            **os.environ,
            **env,
            "CAMPAIGN_DIR": str(out),
            "SHARDS": "2",
            "CAMPAIGN_ARGS": SMALL_CAMPAIGN.replace("--power-cut 3", "--power-cut-at 20"),
            "FUSEFS_SRC": str(ROOT),
            "SBATCH_LOG": str(log),
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    logged = log.read_text() if log.exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + logged
    merged = json.loads((out / "merged" / "matrix.json").read_text())
    assert merged["merged"]["count"] == 2
    ids = [f"{r[1]} {r[2]}" for r in outcome_table(merged)]
    assert ids == ["blockdev_write oneshot", "direct_read_buffer oneshot", "cut@20 drop"]
    assert sorted(p.name for p in out.iterdir()) == ["merged", "plan", "shard-1", "shard-2"]
    assert re.search(r"merged 2 shards: 3 runs", logged), logged
