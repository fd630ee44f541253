"""tpu/pod.sh: the gcloud commands its dry run prints, its errors; shellcheck on every shell script."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POD = REPO / "tpu" / "pod.sh"


def pod(*args, env=None):
    e = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"}
    e.update(env or {})
    p = subprocess.run(["bash", str(POD), *args], capture_output=True, text=True, env=e, timeout=60)
    return p.returncode, p.stdout, p.stderr


def commands(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert all(ln.startswith("+ ") for ln in lines), out
    return [shlex.split(ln[2:]) for ln in lines]


def test_dry_run_of_a_multi_host_slice(tmp_path):
    rc, out, err = pod("--dry-run", "--zone=us-west4-a", "--project=my-proj", "--accelerator=v5litepod-16",
                       "--spot", "--glue=gs://my-bucket/glue/", "--name=peft-pod", "--run=sst2-bitfit",
                       f"--results={tmp_path}/res", "all", "--", "--method=bitfit", "--task=sst2",
                       "--batch_size=256", "--output_note=two words")
    assert rc == 0, err
    cmds = commands(out)
    where = ["--zone=us-west4-a", "--project=my-proj"]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    archive = "/tmp/jaxpeft-peft-pod.tar.gz"
    expected_head = [
        tpu + ["create", "peft-pod", *where, "--accelerator-type=v5litepod-16",
               "--version=v2-alpha-tpuv5-lite", "--spot"],
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, "HEAD"],
        tpu + ["scp", archive, "peft-pod:jaxpeft.tar.gz", *where, "--worker=all"],
    ]
    assert cmds[:3] == expected_head
    ssh = [c for c in cmds if c[:5] == tpu + ["ssh"]]
    assert len(ssh) == 3
    for c in ssh:   # every remote command reaches every worker of the slice
        assert c[:6 + len(where)] == tpu + ["ssh", "peft-pod", *where] and c[-2] == "--worker=all"
        assert c[-1].startswith("--command=")
    glue_cmd, setup_cmd, train_cmd = (c[-1][len("--command="):] for c in ssh)
    assert shlex.split(glue_cmd)[-3:] == ["-r", "gs://my-bucket/glue/*", "~/glue/"]
    assert setup_cmd.endswith("tar -xzf ~/jaxpeft.tar.gz -C ~/jaxpeft && bash ~/jaxpeft/tpu/worker_setup.sh")
    train_words = shlex.split(train_cmd)
    i = train_words.index("jaxpeft/scripts/train.py")
    assert train_words[i - 1] == "jaxpeft/.venv/bin/python" and train_words[:2] == ["cd", "~"]
    assert train_words[i + 1:] == ["--data_dir=glue", "--output_dir=runs/sst2-bitfit", "--no-progress",
                                   "--method=bitfit", "--task=sst2", "--batch_size=256",
                                   "--output_note=two words"]
    assert cmds[-3:] == [
        ["mkdir", "-p", str(tmp_path)],
        tpu + ["scp", "--recurse", "peft-pod:runs/sst2-bitfit", f"{tmp_path}/res", *where, "--worker=0"],
        tpu + ["delete", "peft-pod", *where, "--quiet"],
    ]
    assert len(cmds) == 9
    assert not (tmp_path / "res").exists()   # a dry run runs nothing


def test_dry_run_single_host_local_glue_and_keep(tmp_path):
    rc, out, err = pod("--dry-run", "--zone=us-central2-b", "--preemptible", f"--glue={tmp_path}", "--keep",
                       "all")
    assert rc == 0, err
    cmds = [c for c in commands(out) if c[0] == "gcloud"]
    create = cmds[0]
    assert create[4:] == ["create", f"jaxpeft-{os.environ.get('USER', 'tpu')}", "--zone=us-central2-b",
                          "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--preemptible"]
    scp_glue = [c for c in cmds if c[4] == "scp" and c[5] == "--recurse" and c[6] == str(tmp_path)]
    assert len(scp_glue) == 1 and scp_glue[0][-1] == "--worker=all" and scp_glue[0][7].endswith(":glue")
    assert all(c[4] != "delete" for c in cmds)   # --keep
    assert "--data_dir=glue" in shlex.split([c for c in cmds if c[4] == "ssh"][-1][-1])


@pytest.mark.parametrize("args,needle", [
    (["all"], "--zone is required"),
    (["--zone=z"], "no COMMAND given"),
    (["--zone=z", "--accelerator=v9x-8", "create"], "unknown family; give --version=RUNTIME"),
    (["--zone=z", "--name=Bad_Name", "create"], "lowercase letters, digits and dashes"),
    (["--zone=z", "create", "delete"], "one COMMAND only"),
    (["--zone=z", "--frobnicate", "create"], "unknown argument '--frobnicate'"),
    (["--zone=z", "--glue=/nonexistent/glue", "setup"], "is not a folder"),
])
def test_bad_arguments_are_one_line(args, needle):
    rc, out, err = pod(*args)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: ") and needle in err


def test_help_lists_the_commands():
    rc, out, _ = pod("--help")
    assert rc == 0 and "tpu/pod.sh [OPTIONS] COMMAND" in out and "--dry-run" in out


def test_shellcheck_clean():
    scripts = sorted(str(p) for d in ("tpu", "benchmarks", "scripts") for p in (REPO / d).glob("*.sh"))
    assert len(scripts) >= 4
    if shutil.which("shellcheck") is None:
        if os.environ.get("JAXPEFT_CI"):
            pytest.fail("shellcheck is not installed (.ci/run installs it)")
        pytest.skip("shellcheck is not installed")
    p = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
