"""benchmarks/profile_step.py: reading a profiler trace back (device streams only, kernels grouped
by kind, per step), and the script end to end on CPU (no device kernels there, but it must run)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "profile_step.py")
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


def _trace():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}},
    ]
    ev = lambda pid, tid, name, dur, hlo="": {"ph": "X", "pid": pid, "tid": tid, "name": name,  # noqa: E731
                                              "dur": dur, "ts": 0, "args": {"hlo_op": hlo}}
    events = [
        ev(2, 7, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 300.0),
        ev(2, 7, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 100.0),
        ev(2, 7, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 50.0),
        ev(2, 7, "loop_convert_multiply_fusion_11", 40.0),
        ev(2, 7, "input_add_reduce_fusion_8", 30.0),
        ev(2, 7, "loop_xor_fusion_24", 20.0, "rng-bit-generator"),
        ev(2, 8, "fusion.1", 999.0),          # the XLA Ops line repeats kernels: not counted
        ev(1, 1, "PjitFunction(step)", 5000.0),  # host: not counted
    ]
    return {"traceEvents": meta + events}


def test_device_events_keep_only_kernel_streams():
    events, threads = profile_step.device_events(_trace())
    assert len(events) == 6 and {e["tid"] for e in events} == {7}
    assert threads == ["Stream #14(Compute)", "XLA Ops"]


def test_summary_groups_kernels_per_step():
    events, _ = profile_step.device_events(_trace())
    kinds, top = profile_step.summarize(events, steps=2)
    assert kinds == {"matmul": 200.0, "attention (cuDNN)": 25.0, "other fusion": 20.0,
                     "reduction fusion": 15.0, "random bits": 10.0}
    us, calls, name, _ = top[0]
    assert (us, calls, name) == (200.0, 1.0, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT")


def test_script_runs_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--size=tiny",
                        "--batch=4", "--seq=16", "--steps=2", f"--out={tmp_path}", "--name=t"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (tmp_path / "profile_t.md").read_text()
    assert md.startswith("# Profile: t (tiny, batch 4, seq 16")
    assert (tmp_path / "hlo_t.txt.gz").stat().st_size > 1000
