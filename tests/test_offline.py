"""No network: one line that says how to work offline, not retries; every log line once; no third-party noise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO


def closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_lowbit(args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf-home"), "COLUMNS": "200",
                   "LOWBIT_DATA_DIR": str(tmp_path / "no-data"), **env}
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=300)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("command", [["plan", "acme/some-model"],
                                     ["quantize", "acme/some-model", "-o", "out", "--method", "rtn"]])
def test_unreachable_hub_gives_one_line_with_the_offline_recipe(tmp_path, command):
    result = run_lowbit(command, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 2, result.stderr
    assert len(lines(result.stderr)) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error:") and "acme/some-model" in line
    assert "cannot be reached" in line and "HF_HUB_OFFLINE=1" in line and "local folder" in line
    assert "Retrying" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_offline_mode_without_the_file_in_the_cache_says_so(tmp_path):
    result = run_lowbit(["plan", "acme/some-model"], tmp_path, HF_HUB_OFFLINE="1",
                        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 2
    assert lines(result.stderr) == [result.stderr.strip()]
    assert "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" in result.stderr


def test_gptq_default_calibration_falls_back_to_pydoc_with_one_warning_naming_the_cost(tmp_path):
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", layers=1)
    result = run_lowbit(["quantize", str(model), "-o", "out", "--nsamples", "2", "--seqlen", "32", "--group-size", "32",
                         "--json"], tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("calibrating on pydoc") == 1, result.stderr
    assert result.stderr.count("WARNING") == 1
    message = " ".join(result.stderr.split())  # the log handler may wrap it
    assert "ratio 1.92, against 1.50 with c4" in message and "LOWBIT_DATA_DIR" in message
    assert '"source": "pydoc"' in result.stdout


def test_gptq_default_calibration_is_c4_from_the_local_data_folder(tmp_path):
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", layers=1)
    data = tmp_path / "data" / "c4"
    data.mkdir(parents=True)
    (data / "c4-sample.jsonl").write_text("".join(f'{{"text": "document {i}: the quick brown fox."}}\n'
                                                  for i in range(40)))
    result = run_lowbit(["quantize", str(model), "-o", "out", "--nsamples", "2", "--seqlen", "32", "--group-size", "32",
                         "--json"], tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
                        LOWBIT_DATA_DIR=str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "pydoc" not in result.stderr
    assert '"source": "c4"' in result.stdout


def test_calibrated_nf4_is_only_asked_for_by_naming_a_source(tmp_path):
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", layers=1)
    result = run_lowbit(["quantize", str(model), "-o", "out", "--method", "nf4", "--json"], tmp_path,
                        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 0, result.stderr
    assert '"calibration": null' in result.stdout and "pydoc" not in result.stderr


LOG_ONCE = """
from lowbit.cli import main
main(verbose=False, quiet=False)
import logging
import bitsandbytes.functional  # its CPU backend warns about an optional kernel package at import
from huggingface_hub.utils import logging as hf_logging
hf_logging.get_logger("huggingface_hub.utils._http").warning("hub says hello")
logging.getLogger("lowbit").warning("lowbit says hello")
"""


def test_every_log_line_is_printed_once_and_bitsandbytes_noise_is_silenced(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-c", LOG_ONCE], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("hub says hello") == 1, result.stderr
    assert result.stderr.count("lowbit says hello") == 1
    assert "kernels" not in result.stderr
