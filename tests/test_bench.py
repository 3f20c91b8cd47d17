"""tools/bench.py end to end on a tiny CPU model: it runs train_gpt.py, reads the step lines, and with
--ablate times the run again with a speed feature flipped and prints both side by side."""
import json
import os
import signal
import subprocess
import sys

from conftest import ROOT, subprocess_env


def test_bench_ablation_runs_each_variant_and_tabulates_them(tiny_env, tmp_path):
    env = dict(tiny_env)
    env.pop("RUN_ID")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench.py", "--steps", "16", "--log-every", "2", "--warmup-steps", "0",
                           "--json", str(out), "--ablate", "lean"], cwd=ROOT, env=subprocess_env(env),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results] == ["as configured", "lean"]
    assert results[1]["overrides"] == {"CLOCK_CHECK_EVERY": "1"}
    for r in results:
        assert r["before_loop"]["tokens_per_s"] > 0 and r["after_loop"]["tokens_per_s"] > 0
        assert r["paths"]["attention_backend"] == "sdpa-cpu"
        assert r["paths"]["qk_kernel"] == r["paths"]["loss_kernel"] == "torch"
    assert "| lean |" in proc.stdout and "tokens/s before looping" in proc.stdout


def test_bench_writes_each_finished_variant_before_the_next_starts(tiny_env, tmp_path):
    """A device call's time limit kills bench.py in the middle of an ablation: the JSON already holds the
    variants that finished (it is written before each result is printed, so reading the printed result and
    then killing the process group is the same moment as a limit that strikes during the next run)."""
    env = dict(tiny_env)
    env.pop("RUN_ID")
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "tools/bench.py", "--steps", "16", "--log-every", "2", "--warmup-steps",
                             "0", "--json", str(out), "--ablate", "lean"], cwd=ROOT, env=subprocess_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if '"variant": "as configured"' in line:
                break
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it exited before its first result: the JSON check below says so
        pass
    finally:
        proc.wait(timeout=60)
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results] == ["as configured"]
    assert results[0]["before_loop"]["tokens_per_s"] > 0
