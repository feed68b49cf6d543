"""Launch scripts and accelerate configs: shellcheck-clean scripts, the per-node command of
``scripts/slurm/train.sbatch`` under a fake Slurm (each node reads its OWN rank), one end-to-end fake
2-node job on this machine (2 gloo ranks, 1 per "node") that is preempted with SIGUSR1, requeues itself
and resumes with the same losses as an uninterrupted run, and the eval array's shard/merge steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST
from test_trainer import _losses

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN_SBATCH = REPO / "scripts/slurm/train.sbatch"
EVAL_SBATCH = REPO / "scripts/slurm/eval.sbatch"
MERGE_EVAL = REPO / "scripts/slurm/merge_eval.sh"
LAUNCH_SH = REPO / "scripts/launch.sh"
SHELL_SCRIPTS = [LAUNCH_SH, TRAIN_SBATCH, EVAL_SBATCH, MERGE_EVAL]
DEMO_EVAL = "data_mixtures/demo_eval.yaml"


# Fake Slurm commands. srun runs its command once per fake node, in the background, with that node's
# SLURM_NODEID, and exits with the highest exit code (like srun). It records its pid so a test can
# signal "every process of the job step" as Slurm's --signal (without B:) does.
FAKE_SRUN = r"""#!/bin/bash
echo $$ > "$FAKE_SLURM_DIR/srun.pid"
while [[ ${1:-} == -* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do c=0; wait "$p" || c=$?; ((c > rc)) && rc=$c; done
exit "$rc"
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1" in
  show) [[ $2 == hostnames ]] || exit 1; for ((n = 0; n < SLURM_NNODES; n++)); do echo localhost; done ;;
  requeue) echo "$*" >> "$FAKE_SLURM_DIR/scontrol.log" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"  # accelerate of this venv
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    env.update(extra)
    return env


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    """Environment of a fake 2-node Slurm job (job 4242) with stub srun/scontrol first on PATH."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2",
               FAKE_SLURM_DIR=str(tmp_path), MTF_EXIT_DIR=str(tmp_path / "exit"))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


# ------------------------------------------------------------------------------------------ static checks


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (Debian: apt-get install -y shellcheck)")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict(script):
    code = [line for line in script.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert code[0] == "set -euo pipefail", f"{script.name}: the first command must be `set -euo pipefail`"


def test_accelerate_configs_load_and_point_at_real_files():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted((REPO / "configs/accelerate").glob("*.yaml"))}
    assert {"cpu_2proc", "single_node_ddp", "single_node_zero2", "single_node_zero3", "multi_node_ddp",
            "multi_node_zero2", "multi_node_zero3"} <= set(configs)
    for name, cfg in configs.items():
        kind = str(cfg.distributed_type).split(".")[-1]
        if "zero" in name:
            assert kind == "DEEPSPEED", name
            ds_file = REPO / cfg.deepspeed_config["deepspeed_config_file"]
            stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
            assert name.endswith(f"zero{stage}"), (name, ds_file, stage)
        else:  # the CPU config too: MULTI_CPU would silently start one process (FIELD_NOTES)
            assert kind == "MULTI_GPU", name
        if name.startswith("multi_node"):
            assert cfg.rdzv_backend == "c10d" and cfg.same_network is False and cfg.num_machines == 2, name
            if kind == "DEEPSPEED":  # one torchrun per node started by srun, not DeepSpeed's pdsh
                assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard", name
    assert configs["cpu_2proc"].num_processes == 2


# ------------------------------------------------------------------------------------------ train.sbatch logic


def _node_commands(output: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"\[mtf node (\d+)/\d+ on [^\]]*\] (.*)", output)}


def test_every_node_gets_its_own_machine_rank_and_the_same_rendezvous(fake_slurm):
    overrides = ["trainer.max_steps=7", "run.name=two words", "optim.lr=1e-4"]
    env = dict(fake_slurm, DRY_RUN="1", GPUS_PER_NODE="8")
    proc = subprocess.run(["bash", str(TRAIN_SBATCH), "configs/demo.yaml", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = _node_commands(proc.stdout)
    assert sorted(nodes) == [0, 1]
    port = 20000 + 4242 % 40000
    for rank, line in nodes.items():
        # the rank comes from the node's own SLURM_NODEID, expanded on the node (accelerate#2816)
        assert f"--machine_rank {rank} " in line
        assert f"--rdzv_conf is_host={int(rank == 0)} " in line
        assert "--num_machines 2 --num_processes 16 " in line
        assert f"--main_process_ip localhost --main_process_port {port} --rdzv_backend c10d " in line
        # config path and overrides reach `mtf train` unchanged (quoted with printf %q)
        assert line.rstrip().endswith(r"train configs/demo.yaml trainer.max_steps=7 run.name=two\ words optim.lr=1e-4")


def test_gpus_per_node_comes_from_slurm(fake_slurm):
    env = dict(fake_slurm, DRY_RUN="1", SLURM_GPUS_ON_NODE="4")
    proc = subprocess.run(["bash", str(TRAIN_SBATCH), "configs/demo.yaml"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all("--num_processes 8 " in line for line in _node_commands(proc.stdout).values())


@pytest.mark.parametrize("missing, message", [
    ("SLURM_JOB_ID", "SLURM_JOB_ID: is not set: submit this script with sbatch"),
    ("SLURM_NNODES", "SLURM_NNODES: is not set: submit this script with sbatch"),
])
def test_train_sbatch_outside_slurm_says_what_is_missing(fake_slurm, missing, message):
    env = dict(fake_slurm, GPUS_PER_NODE="1")
    del env[missing]
    proc = subprocess.run(["bash", str(TRAIN_SBATCH), "configs/demo.yaml"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_train_sbatch_rejects_a_missing_config_and_bad_gpu_count(fake_slurm):
    proc = subprocess.run(["bash", str(TRAIN_SBATCH), "configs/nope.yaml"], cwd=REPO, env=dict(fake_slurm, GPUS_PER_NODE="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run config 'configs/nope.yaml' not found" in proc.stderr
    proc = subprocess.run(["bash", str(TRAIN_SBATCH)], cwd=REPO, env=fake_slurm, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: sbatch scripts/slurm/train.sbatch CONFIG" in proc.stderr
    proc = subprocess.run(["bash", str(TRAIN_SBATCH), "configs/demo.yaml"], cwd=REPO,
                          env=dict(fake_slurm, GPUS_PER_NODE="eight"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "GPUS_PER_NODE must be a positive integer, got 'eight'" in proc.stderr


# ------------------------------------------------------------------------------------------ launch.sh


def test_launch_sh_cpu_mode_really_asks_for_two_gloo_processes():
    proc = subprocess.run(["bash", str(LAUNCH_SH), "configs/demo.yaml", "trainer.max_steps=3"], cwd=REPO,
                          env=_env(MTF_CPU="1", DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("accelerate launch --config_file configs/accelerate/cpu_2proc.yaml --num_processes 2 --num_machines 1 "
            in proc.stdout)
    assert proc.stdout.rstrip().endswith("python -m train.cli train configs/demo.yaml trainer.max_steps=3")


def test_launch_sh_one_gpu_runs_the_trainer_directly_and_checks_its_inputs(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH_SH), "configs/demo.yaml"], cwd=REPO, env=_env(NUM_GPUS="1", DRY_RUN="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "[mtf] python -m train.cli train configs/demo.yaml" in proc.stdout
    env = _env()
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}/usr/bin:/bin"  # no nvidia-smi here
    env.pop("NUM_GPUS", None)
    if shutil.which("nvidia-smi", path=env["PATH"]) is None:
        proc = subprocess.run(["bash", str(LAUNCH_SH), "configs/demo.yaml"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "set NUM_GPUS, or MTF_CPU=1" in proc.stderr
    proc = subprocess.run(["bash", str(LAUNCH_SH), "missing.yaml"], cwd=REPO, env=_env(NUM_GPUS="2"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run config 'missing.yaml' not found" in proc.stderr


# ------------------------------------------------------------------------------------------ end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_job(env: dict, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(env, MTF_CPU="1", MAIN_PROCESS_PORT=str(_free_port()))
    return subprocess.Popen(["bash", str(TRAIN_SBATCH), "configs/demo.yaml", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_fake_two_node_job_trains_is_preempted_requeues_and_resumes(tmp_path, fake_slurm):
    import psutil

    run = tmp_path / "run"
    common = [*FAST, f"run.output_dir={run}", "checkpoint.every_steps=2", "checkpoint.keep_last=3"]

    # Reference: one process, uninterrupted (the trainer makes 1 and 2 ranks train identically).
    ref_dir = tmp_path / "ref"
    ref = subprocess.run([PY, "-m", "train.cli", "train", "configs/demo.yaml", *FAST, "trainer.max_steps=10",
                          f"run.output_dir={ref_dir}", "checkpoint.every_steps=100"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _losses(ref_dir)

    # First start: 2 "nodes" x 1 process. SIGUSR1 to every process of the job step once a checkpoint exists.
    log1 = tmp_path / "job1.log"
    job = _fake_job(fake_slurm, [*common, "trainer.max_steps=400"], log1)
    marker = run / "checkpoints" / "step-00000002" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert job.poll() is None, log1.read_text()[-4000:]
        assert time.time() < deadline, "no checkpoint appeared: " + log1.read_text()[-4000:]
        time.sleep(0.05)
    srun_pid = int((tmp_path / "srun.pid").read_text())
    step_processes = psutil.Process(srun_pid).children(recursive=True)
    assert len(step_processes) >= 6  # per node: mtf_node shell, launcher, rank wrapper, trainer
    for p in step_processes:
        try:
            p.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            pass
    assert job.wait(timeout=300) == 3, log1.read_text()[-4000:]
    out1 = log1.read_text()
    assert "= 2 ranks x 1 accumulation x 2 rows" in out1, out1[-4000:]  # really 2 ranks, one per node
    digests = re.findall(r"\[mtf\] rank (\d)/2 step 1 rows digest (\w+)", out1)
    assert sorted(r for r, _ in digests) == ["0", "1"] and digests[0][1] != digests[1][1], digests
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    assert sorted((tmp_path / "exit").iterdir())  # every rank recorded the trainer's own code...
    assert {f.read_text().strip() for f in (tmp_path / "exit").iterdir()} == {"3"}  # ...which torchrun reports as 1
    first = _losses(run)
    stopped_at = max(first)
    assert 2 <= stopped_at < 10, first
    for step, loss in first.items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])

    # The requeued start: same command, resumes from the preemption checkpoint and finishes.
    log2 = tmp_path / "job2.log"
    job = _fake_job(fake_slurm, [*common, "trainer.max_steps=10"], log2)
    assert job.wait(timeout=300) == 0, log2.read_text()[-4000:]
    out2 = log2.read_text()
    assert f"resumed from {run}/checkpoints/step-{stopped_at:08d} at step {stopped_at}" in out2, out2[-4000:]
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1  # no second requeue
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(stopped_at + 1, 11):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])


# ------------------------------------------------------------------------------------------ eval shards
# `mtf eval --shard I/N` + `mtf eval-merge` (train/evaluation/runner.py), as eval.sbatch / merge_eval.sh use them.
# No model here: tests/test_eval_runner.py runs a real tiny T5 through the same path.


def test_each_eval_shard_is_one_template_of_the_mixture():
    from train.errors import ConfigError
    from train.evaluation.runner import load_examples, mixture_pairs, parse_shard, select_pairs
    from train.data.tasks import load_task_file

    full = load_task_file(REPO / DEMO_EVAL)
    expected = [(t.metadata.dataset, tpl.name) for t in full.tasks.values() for tpl in t.select_templates()]
    pairs = mixture_pairs(str(REPO / DEMO_EVAL))
    assert pairs == expected and len(expected) == 12  # mixture order: templates-file order
    for i in range(12):  # N = number of pairs: element i scores exactly pair i (BLOOMZ)
        assert select_pairs(pairs, *parse_shard(f"{i}/12")) == [expected[i]]
    assert select_pairs(pairs, 1, 5) == [expected[1], expected[6], expected[11]]  # round robin otherwise

    # a shard's rows are exactly the whole mixture's rows of its template, in the same order
    whole, clusters, languages = load_examples(str(REPO / DEMO_EVAL))
    rows, shard_clusters, shard_languages = load_examples(str(REPO / DEMO_EVAL), [expected[1]])
    reference = [r for r in whole if r["template"] == expected[1][1]]
    assert len(rows) == 48 and rows == reference  # this template renders only the "effect" questions
    assert (shard_clusters, shard_languages) == (clusters, languages) == ({"super_glue/copa": "sentence_completion"},
                                                                          {"super_glue/copa": "en"})

    with pytest.raises(ConfigError, match=r"INDEX must be in 0\.\.11; .* --array=0-11"):
        parse_shard("12/12")
    with pytest.raises(ConfigError, match=r"write it as INDEX/COUNT"):
        parse_shard("3")
    with pytest.raises(ConfigError, match=r"has only 12 \(dataset, template\) pairs, so COUNT must be at most 12.*"
                                          r"--array=0-11"):
        select_pairs(pairs, 0, 13, DEMO_EVAL)


def _row(score: float, n: int = 10) -> dict:
    return {"task": "t", "n": n, "skipped": {}, "num_skipped": 0, "metric": "accuracy", "accuracy": score,
            "accuracy_length_normalized": score / 2, "chance": 0.5, "score": score}


def _write_shards(folder: Path, rows: dict, count: int, clusters: dict, languages: dict,
                  skip: tuple[int, ...] = ()) -> list[Path]:
    """Shard result files as `mtf eval --shard i/count --output` writes them, for synthetic template rows."""
    from train.evaluation.runner import select_pairs
    from train.evaluation.results import aggregate

    pairs = [(d, t) for d in rows for t in rows[d]]
    paths = []
    for index in range(count):
        if index in skip:
            continue
        mine = select_pairs(pairs, index, count)
        per_template: dict = {}
        for d, t in mine:
            per_template.setdefault(d, {})[t] = rows[d][t]
        doc = aggregate(per_template, {d: clusters[d] for d in per_template}, {d: languages[d] for d in per_template})
        doc["meta"] = {"kind": "encdec", "num_examples": 10 * len(mine), "num_processes": 1 + index % 2,
                       "shard": {"index": index, "count": count, "pairs": [list(p) for p in mine]}}
        path = folder / f"shard-{index:05d}.json"
        path.write_text(json.dumps(doc))
        paths.append(path)
    return paths


def test_merging_shards_equals_aggregating_everything_at_once(tmp_path):
    from train.errors import DataError
    from train.evaluation.runner import merge_results
    from train.evaluation.results import aggregate

    rows = {"a/x": {"t1": _row(0.6), "t2": _row(0.7), "t3": _row(0.9)}, "b": {"u1": _row(0.3), "u2": _row(0.5)}}
    clusters, languages = {"a/x": "nli", "b": "coref"}, {"a/x": "en", "b": "fr"}
    whole = aggregate(rows, clusters, languages)
    for count in (5, 2):  # one pair per shard, and several
        folder = tmp_path / str(count)
        folder.mkdir()
        paths = _write_shards(folder, rows, count, clusters, languages)
        merged = merge_results(list(reversed(paths)))  # any order of completion
        for key in ("templates", "datasets", "clusters", "languages"):
            assert merged[key] == whole[key], key
        assert merged["datasets"]["a/x"]["median"] == 0.7 and merged["clusters"]["coref"]["mean"] == 0.4
        assert merged["datasets"]["b"]["language"] == "fr" and merged["languages"]["fr"]["datasets"] == ["b"]
        # what all shards agree on is kept, example counts add up, num_processes differed so it is dropped
        assert merged["meta"] == {"kind": "encdec", "num_examples": 50, "shard": None,
                                  "merged_from": [str(p) for p in reversed(paths)]}

    paths = _write_shards(tmp_path / "5", rows, 5, clusters, languages)
    copy = tmp_path / "copy.json"
    copy.write_text(paths[3].read_text())
    with pytest.raises(DataError, match=r"copy.json and .*shard-00003.json are both shard 3/5"):
        merge_results([*paths, copy])
    doc = json.loads(paths[3].read_text())
    doc["meta"]["shard"] = None  # an unsharded result holding a pair a shard also has
    copy.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"b/u1 appears in two shard results, .*shard-00003.json and .*copy.json"):
        merge_results([*paths, copy])
    with pytest.raises(DataError, match=r"job arrays of different sizes: 2 \(.*\), 5 \(.*\)"):
        merge_results([*paths[:2], *_write_shards(tmp_path / "2", rows, 2, clusters, languages)[1:]])


def _demo_rows() -> dict:
    from train.evaluation.runner import mixture_pairs

    pairs = mixture_pairs(str(REPO / DEMO_EVAL))
    return {"super_glue/copa": {t: _row(0.5 + i / 100) for i, (_, t) in enumerate(pairs)}}


DEMO_CLUSTERS = ({"super_glue/copa": "sentence_completion"}, {"super_glue/copa": "en"})


def test_merge_names_a_missing_shard(tmp_path):
    from train.errors import DataError
    from train.evaluation.runner import merge_results

    paths = _write_shards(tmp_path, _demo_rows(), 12, *DEMO_CLUSTERS, skip=(2,))
    with pytest.raises(DataError, match=r"missing 1 of 12 \(dataset, template\) pairs of .*demo_eval.yaml: "
                                        r"super_glue/copa/i_am_hesitating\. Rerun array indices 2 \(sbatch --array=2 "):
        merge_results(paths, mixture=str(REPO / DEMO_EVAL))
    with pytest.raises(DataError, match=r"missing 1 of 12 shards: indices 2 have no result file.*--array=2 .*--mixture"):
        merge_results(paths)  # from the shards' meta counts alone

    three = tmp_path / "three"
    three.mkdir()
    paths = _write_shards(three, _demo_rows(), 3, *DEMO_CLUSTERS, skip=(1,))
    with pytest.raises(DataError, match=r"missing 4 of 12 .*: super_glue/copa/…What could happen next, C1 or C2\?, "
                                        r".*Rerun array indices 1 .*--shard I/3"):
        merge_results(paths, mixture=str(REPO / DEMO_EVAL))


def test_eval_array_element_runs_mtf_eval_on_its_shard_and_merge_script_aggregates(tmp_path):
    from train.evaluation.runner import merge_results

    model, out = tmp_path / "model", tmp_path / "eval"
    model.mkdir()
    env = _env(SLURM_ARRAY_TASK_ID="3", SLURM_JOB_ID="77", DRY_RUN="1")
    args = ["bash", str(EVAL_SBATCH), str(model), DEMO_EVAL, str(out)]
    proc = subprocess.run(args + ["--batch-size", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # N counted by `mtf eval --count-shards`: 12 pairs, so element 3 scores pair 3 alone
    assert (f"[mtf] python -m train.cli eval {model} --mixture {DEMO_EVAL} --shard 3/12 --json --output "
            f"{out}/shards/shard-00003.json --batch-size 4") in proc.stdout
    proc = subprocess.run(args, cwd=REPO, env=dict(env, N="4"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--shard 3/4 --json" in proc.stdout, proc.stderr
    bad = subprocess.run(args, cwd=REPO, env=dict(env, SLURM_ARRAY_TASK_ID="12"), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "there are N=12 shards: submit the array as --array=0-11" in bad.stderr
    bad = subprocess.run(args, cwd=REPO, env=dict(env, N="x"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must be a positive number, got 'x'" in bad.stderr
    # an element whose result exists is skipped, unless FORCE=1
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-00003.json").write_text("{}")
    proc = subprocess.run(args, cwd=REPO, env=dict(env, N="12"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exists; skipping" in proc.stdout and "train.cli eval" not in proc.stdout
    proc = subprocess.run(args, cwd=REPO, env=dict(env, N="12", FORCE="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--shard 3/12" in proc.stdout

    paths = _write_shards(out / "shards", _demo_rows(), 12, *DEMO_CLUSTERS)
    proc = subprocess.run(["bash", str(MERGE_EVAL), DEMO_EVAL, str(out)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((out / "results.json").read_text())
    assert merged["datasets"]["super_glue/copa"]["num_templates"] == 12
    assert merged["datasets"]["super_glue/copa"]["median"] == pytest.approx(0.555)
    assert "median over 12 templates" in proc.stdout
    assert merged["templates"] == merge_results(paths)["templates"] == _demo_rows()

    paths[5].unlink()
    proc = subprocess.run(["bash", str(MERGE_EVAL), DEMO_EVAL, str(out)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Rerun array indices 5" in proc.stderr and "Traceback" not in proc.stderr
