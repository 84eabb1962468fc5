"""Every write is safe on a full disk and on Ctrl-C: one line names the file and the cause, the
exit status is non-zero, nothing partial or temporary is left, and an interrupted write leaves
the old file whole.

The full disk is real: a 1 MiB tmpfs filled to its last kilobytes where the suite may mount one
(as root), and everywhere a file-size limit (RLIMIT_FSIZE), under which the kernel refuses any
write past the limit as a full disk does (EFBIG for ENOSPC), for Python's writes and the Rust
ones of safetensors alike. The commands run as subprocesses, as a user runs them.
"""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipadapter_min import demo
from ipadapter_min.formats.files import read_state_dict, write_atomically
from ipadapter_min.formats.ip_adapter import to_project_layout
from ipadapter_min.training import checkpoint as training_checkpoint
from ipadapter_min.training.checkpoint import find_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not demo.installed(), reason="the demo weights are not installed")
ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4096  # bytes: a file may grow to this and no further


@pytest.fixture(params=["tmpfs", "file-size limit"])
def full_disk(request, tmp_path):
    """(a folder on a full disk, the preexec_fn its commands run with)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if request.param == "file-size limit":
        def limited():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
        yield folder, limited
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the file-size-limit case covers the same path")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("this machine refuses to mount a tmpfs (a container without the privilege); the file-size-limit "
                    "case covers the same path")
    try:
        filler = folder / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill it to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield folder, None
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def command(args: list[str], preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          preexec_fn=preexec, timeout=300)


def default_signals() -> None:
    """Ctrl-C as a terminal gives it: a suite started in the background inherits SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


@pytest.mark.slow  # commands in subprocesses
@pytest.mark.parametrize("kind", ["sample", "weights_convert"])
def test_a_full_disk_gives_one_line_naming_the_file(full_disk, kind):
    folder, preexec = full_disk
    out = folder / ("out.png" if kind == "sample" else "sd15.safetensors")
    args = (["-m", "ipadapter_min.sample", "--prompt", "a red circle", "--steps", "2", "--no-progress", "--out", str(out)]
            if kind == "sample" else ["-m", "weights_convert", "sd15", str(demo.WEIGHTS), "-o", str(out)])
    result = command(args, preexec)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {out}: not written ("), result.stderr
    assert "No space left on device" in result.stderr or "File too large" in result.stderr, result.stderr
    assert left_in(folder) == []


WRITER = """
import sys, time
from ipadapter_min.formats.files import write_atomically

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half of the new")
    print("writing", flush=True)
    time.sleep(60)

write_atomically(sys.argv[1], write, overwrite=True)
"""


@pytest.mark.slow  # commands in subprocesses
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, signum):
    """A real signal, sent to a process in the middle of writing."""
    path = tmp_path / "image.png"
    path.write_bytes(b"the old file")
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    assert process.stdout.readline() == "writing\n"
    assert len(list(tmp_path.iterdir())) == 2  # the old file and the temporary being written
    process.send_signal(signum)
    process.wait(timeout=30)
    assert process.returncode != 0
    assert path.read_bytes() == b"the old file" and [p.name for p in tmp_path.iterdir()] == ["image.png"]
    if signum == signal.SIGTERM:
        assert process.returncode == -signal.SIGTERM  # ended as SIGTERM ends a process, once cleaned up


def test_a_failing_writer_leaves_nothing_and_names_the_file(tmp_path):
    def fails(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("the encoder broke")

    with pytest.raises(OSError, match=rf"^{tmp_path / 'x.png'}: not written \(RuntimeError: the encoder broke\)$"):
        write_atomically(tmp_path / "x.png", fails)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def adapter_state():
    return to_project_layout(read_state_dict(demo.ADAPTER), demo.ADAPTER)[0].tensors


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_training_interrupted_mid_checkpoint_resumes_from_the_last_whole_one(tmp_path, adapter_state, monkeypatch,
                                                                             failure):
    first, second = ({"step": n, "skipped_images": 0, "recipe": {"seed": 3}} for n in (1, 2))
    save_checkpoint(tmp_path / "checkpoint-1", adapter_state, {"optimizer": {}, "scaler": {}}, first)
    real_save = torch.save

    def save_then_fail(obj, path):
        real_save(obj, path)
        raise failure

    monkeypatch.setattr(training_checkpoint.torch, "save", save_then_fail)
    for folder in ("checkpoint-2", "checkpoint-1"):  # a new one, and the old one rewritten
        with pytest.raises(KeyboardInterrupt if failure is KeyboardInterrupt else OSError):
            save_checkpoint(tmp_path / folder, adapter_state, {"optimizer": {}, "scaler": {}}, second, overwrite=True)
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert training_checkpoint.load_checkpoint(tmp_path / "checkpoint-1")[2] == first


@pytest.mark.slow  # commands in subprocesses
def test_ctrl_c_during_a_generation_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out.png"
    process = subprocess.Popen([sys.executable, "-m", "ipadapter_min.sample", "--prompt", "a red circle", "--steps",
                                "900", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=default_signals)
    seen = b""
    while b"%" not in seen:  # the progress bar has started: the generation is under way
        byte = process.stderr.read(1)
        assert byte, seen
        seen += byte
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.decode().rsplit("\r", 1)[-1].split("\n")[-2:] == ["interrupted", ""], err[-300:]
    assert list(tmp_path.iterdir()) == []
