"""helm_config/ and scripts/run-helm: our HELM deployment, the challenge's confs, the HELM script.

The end-to-end test starts a live server on the embedded SmolLM2 and runs the real helm-run and
helm-summarize (crfm-helm 0.5.16 in .venv-helm) through scripts/run-helm with the offline smoke
conf, as a user would (`scripts/run-helm smoke`), on 2 instances per entry to stay quick.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onegpu.server.app import create_app
from onegpu.settings import ServeSettings
from tests.conftest import REPO
from tests.deploy.conftest import SCRIPTS
from tests.live import live_server

CONFS = REPO / "helm_config" / "run_entries"
# The organisers' confs (read-only reference data beside the repository; absent in a fresh clone).


def entries(conf: Path) -> list[str]:
    return re.findall(r'description:\s*"([^"]+)"', conf.read_text())


def instances(descriptions: list[str]) -> int:
    return sum(int(re.search(r"max_eval_instances=(\d+)", d).group(1)) for d in descriptions)


# --------------------------------------------------------------------------- the confs


@pytest.mark.parametrize(
    ("ours", "budget"), [("sample_600.conf", 600), ("open_2000.conf", 2000)], ids=["sample", "open"]
)
def test_challenge_confs_keep_the_challenges_budget_and_target_our_deployment(ours, budget):
    descriptions = entries(CONFS / ours)
    assert instances(descriptions) == budget
    assert all("model=onegpu/local" in d for d in descriptions)
    assert len(set(descriptions)) == len(descriptions)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("sample_600.conf", "run_specs_full_coarse_600_budget.conf"),
        ("open_2000.conf", "run_specs_open_2000_budget.conf"),
    ],
    ids=["sample", "open"],
)
def test_challenge_confs_reproduce_the_organisers_entries(ours, theirs, shared_dir):
    reference = shared_dir / "reference" / "challenge" / theirs
    if not reference.is_file():
        pytest.skip(f"the organisers' conf is not at {reference} (set ONEGPU_SHARED_DIR)")
    expected = [d.replace("model=neurips/local", "model=onegpu/local") for d in entries(reference)]
    assert collections.Counter(entries(CONFS / ours)) == collections.Counter(expected)


def test_smoke_conf_leaves_the_instance_count_to_the_script():
    descriptions = entries(CONFS / "smoke_offline.conf")
    assert descriptions and not any("max_eval_instances" in d for d in descriptions)


@pytest.mark.slow
@pytest.mark.helm
def test_confs_and_deployment_load_in_crfm_helm(helm_python, tmp_path):
    """Our YAML registers with HELM and every non-BIG-bench entry becomes run specs for
    onegpu/local (BIG-bench's run spec downloads its task file, so it is left out here)."""
    code = r"""
import collections, json, os, sys
from helm.benchmark.config_registry import (
    register_builtin_configs_from_helm_package, register_configs_from_directory)
from helm.benchmark.model_deployment_registry import get_model_deployment
from helm.benchmark.presentation.run_entry import read_run_entries
from helm.benchmark.run import run_entries_to_run_specs
register_builtin_configs_from_helm_package()
register_configs_from_directory(sys.argv[1])
out = {"deployment": get_model_deployment("onegpu/local").client_spec.args}
for conf in sys.argv[2:]:
    entries = read_run_entries([conf]).entries
    kept = [e for e in entries if not e.description.startswith("big_bench")]
    specs = run_entries_to_run_specs(kept, max_eval_instances=7)
    out[os.path.basename(conf)] = {
        "entries": len(entries),
        "deployments": sorted({s.adapter_spec.model_deployment for s in specs}),
        "scenarios": dict(collections.Counter(s.name.split(":")[0] for s in specs)),
        "instances": sum(s.adapter_spec.max_eval_instances for s in specs),
    }
print(json.dumps(out))
"""
    confs = [
        str(CONFS / name) for name in ("smoke_offline.conf", "sample_600.conf", "open_2000.conf")
    ]
    result = subprocess.run(
        [str(helm_python), "-c", code, str(REPO / "helm_config" / "prod_env"), *confs],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # HELM writes benchmark_output/ relative to the working directory
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["deployment"]["base_url"] == "http://localhost:8080"
    assert got["deployment"]["timeout"] == 3000
    smoke = got["smoke_offline.conf"]
    assert smoke["entries"] == 4 and smoke["instances"] == 4 * 7  # the script's limit applies
    sample, final = got["sample_600.conf"], got["open_2000.conf"]
    assert (sample["entries"], final["entries"]) == (88, 87)
    for conf in (smoke, sample, final):
        assert conf["deployments"] == ["onegpu/local"]
    assert sample["scenarios"] == {
        "mmlu": 55,
        "truthful_qa": 1,
        "summarization_cnndm": 1,
        "gsm": 1,
        "bbq": 1,
    }
    assert sample["instances"] == 600 - 329  # all but BIG-bench's 329
    assert final["instances"] == 2000 - 1096


# --------------------------------------------------------------------------- the table


def test_task_rows_sum_counts_and_weight_means_by_instances(run_helm):
    def run(task, n, score, seconds, metric="exact_match"):
        return {
            "run": f"{task}:x={n}",
            "task": task,
            "problems": [],
            "requests": n,
            "failed_requests": 0,
            "instances": n,
            "empty_completions": 1,
            "metrics": {metric: score},
            "main_metric": metric,
            "num_prompt_tokens": 100.0,
            "num_completion_tokens": 1.0,
            "inference_runtime": seconds,
        }

    runs = [run("mmlu", 10, 1.0, 1.0), run("mmlu", 30, 0.0, 3.0), run("gsm", 5, 0.4, 9.0, "f")]
    runs.append({"run": "mmlu:broken", "task": "mmlu", "problems": ["missing files"]})
    rows = {r["task"]: r for r in run_helm.task_rows(runs)}
    mmlu = rows["mmlu"]
    assert (mmlu["runs"], mmlu["failed_runs"], mmlu["instances"], mmlu["requests"]) == (
        3,
        1,
        40,
        40,
    )
    assert mmlu["score"] == pytest.approx(0.25)  # (10 * 1.0 + 30 * 0.0) / 40
    assert mmlu["seconds"] == pytest.approx(2.5)
    assert mmlu["empty_completions"] == 2
    assert rows["gsm"]["metric"] == "f" and rows["gsm"]["score"] == pytest.approx(0.4)
    table = run_helm.format_table(list(rows.values())).splitlines()
    assert table[0].split()[:3] == ["task", "runs", "inst"]
    assert table[2].split()[:2] == ["mmlu", "3"] and "0.250" in table[2]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.helm
def test_run_helm_smoke_against_a_live_server(helm_python, smol_engine, tmp_path):
    summary = tmp_path / "summary.json"
    with live_server(create_app(ServeSettings(), engine=smol_engine)) as url:
        result = subprocess.run(
            [
                sys.executable,  # not the HELM venv: the script must find it by itself
                str(SCRIPTS / "run-helm"),
                "smoke",
                "--base-url", url,
                "--output-dir", str(tmp_path / "helm"),
                "--max-eval-instances", "2",
                "--strict",
                "--json", str(summary),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )  # fmt: skip
    sys.stdout.write(result.stdout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    got = json.loads(summary.read_text())
    assert got["ok"] and got["helm_run_rc"] == 0 and got["helm_summarize_rc"] == 0
    assert got["threads"] == 30 and got["time_limit_min"] == 30
    tasks = {t["task"]: t for t in got["tasks"]}
    assert set(tasks) == {
        "simple_mcqa",
        "synthetic_reasoning",
        "synthetic_reasoning_natural",
        "simple_classification",
    }
    for task in tasks.values():
        assert (task["instances"], task["requests"], task["failed_requests"]) == (2, 2, 0)
        assert task["metric"] is not None and 0.0 <= task["score"] <= 1.0
        assert task["prompt_tokens"] > 0  # /tokenize worked (HELM hides its failures)
    # The table the user reads, one row per task, then the verdict.
    assert "run-helm smoke: OK" in result.stdout
    for name in tasks:
        assert re.search(rf"^{name}\s+1\s+2\s+2\s+0\b", result.stdout, re.M), name
    assert (tmp_path / "helm" / "runs" / "smoke" / "summary.json").is_file()  # helm-summarize


@pytest.mark.helm
def test_run_helm_rejects_an_unknown_conf(helm_python):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "run-helm"), "no-such-conf"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "neither a preset" in result.stderr
