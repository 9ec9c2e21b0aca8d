"""`tandem serve` as a user runs it: a local Ray, the embedded model's context and generation
workers as actors, the endpoint answering the openai client, and Ctrl-C stopping everything."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import openai

from tandem.workers.sampling_params import SamplingParams
from worker_rpc import free_port


def test_serve_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path, make_llm) -> None:
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        "served_model_name: smollm2\n"
        "pools:\n  context: {kv_cache_bytes: 50000000}\n  generation: {kv_cache_bytes: 50000000}\n"
        "router: {local_prefill_max_tokens: 0}\n"
    )
    command = [sys.executable, "-m", "tandem.orchestrator.cli", "serve", "--config", str(config), "--port", str(port)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if "is serving" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), f"tandem serve did not come up:\n{''.join(lines)}\n{process.stderr.read()[-3000:]}"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12, temperature=0)
        expected = make_llm().generate("The capital of France is", SamplingParams(max_tokens=12))[0].text
        assert reply.choices[0].text == expected
        assert any("curl" in line for line in lines)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert "Stopped." in "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
