"""Issue 22, the first minutes with the CLI: options checked before the model loads, one error
handler, `generate` with the chat template and clean Ctrl-C, `serve`'s exit on signals, threads
and the default KV cache size, and the bench commands' device-sized defaults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kvserve import LLM, SamplingParams
from kvserve.entrypoints.cli import build_parser, main
from tests.conftest import requires_smollm2


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama):
    return tiny_llama[0]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", device="cpu", num_kv_blocks=64, threads=1)


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a model is loaded: the error must come before."""
    from kvserve.entrypoints import llm as llm_mod

    def boom(self, *a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(llm_mod.LLM, "__init__", boom)
    from kvserve.engine import async_engine

    monkeypatch.setattr(async_engine.AsyncLLMEngine, "from_engine_args", classmethod(boom))


TINY = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]


# -- every option is checked before the model loads -------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--kv-cache-memory-gib", "0"], "--kv-cache-memory-gib must be > 0"),
        (["generate", "hi", "--kv-cache-memory-gib", "-1"], "--kv-cache-memory-gib must be > 0 (got -1)"),
        (["generate", "hi", "--max-model-len", "100000"], "--max-model-len 100000 exceeds"),
        (["generate", "hi", "--block-size", "3"], "--block-size must be a power of two"),
        (["generate", "hi", "--max-num-seqs", "0"], "--max-num-seqs must be"),
        (["generate", "hi", "--threads", "0"], "--threads must be an integer >= 1"),
        (["generate", "hi", "--dtype", "float8"], "--dtype must be one of"),
        (["trace", "hi", "--layer", "99"], "--layer must be in [0, 2)"),
        (["chat", "--tensor-parallel-size", "3"], "--tensor-parallel-size=3 must divide"),
        (["serve", "--port", "70000"], "--port must be in"),
    ],
)
def test_options_are_checked_before_the_model_loads(tiny_dir, no_load, capsys, argv, message):
    assert main([*argv, "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert f"kvserve: error: {message}" in err, err
    assert "Traceback" not in err


def test_serve_reports_a_port_in_use_before_loading(tiny_dir, no_load, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(tiny_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: address 127.0.0.1:{port} is already in use" in err


def test_global_options_anywhere():
    parser = build_parser()
    assert parser.parse_args(["--log-level", "debug", "generate", "hi"]).log_level == "DEBUG"
    assert parser.parse_args(["generate", "hi", "--log-level", "info"]).log_level == "INFO"
    assert parser.parse_args(["bench", "latency", "--log-level", "error"]).log_level == "ERROR"
    assert parser.parse_args(["generate", "hi"]).log_level == "WARNING"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--log-level", "loud"])


# -- one handler for unexpected errors ----------------------------------------------------------
def test_unexpected_error_is_one_line_with_a_hint(tiny_dir, monkeypatch, capsys):
    from kvserve.entrypoints import llm as llm_mod

    def oom(self, *a, **k):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried 9 GB\nmore detail")

    monkeypatch.setattr(llm_mod.LLM, "__init__", oom)
    argv = ["generate", "hi", "--model", str(tiny_dir), *TINY]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "kvserve: error: RuntimeError: [enforce fail] DefaultCPUAllocator: can't allocate memory" in err
    assert "more detail" not in err and "Traceback" not in err
    assert "hint: lower --max-num-seqs" in err and "--log-level DEBUG" in err
    assert main([*argv, "--log-level", "DEBUG"]) == 1
    assert "Traceback" in capsys.readouterr().err


# -- generate: chat template, --raw, Ctrl-C ------------------------------------------------------
def test_generate_applies_the_chat_template_unless_raw(tiny_dir, llm, capsys):
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    chat = llm.chat([{"role": "user", "content": "hello"}], greedy, use_tqdm=False)[0].outputs[0].text
    raw = llm.generate("hello", greedy, use_tqdm=False)[0].outputs[0].text
    assert chat != raw
    base = ["generate", "hello", "--model", str(tiny_dir), *TINY, "--max-tokens", "5", "--ignore-eos"]
    assert main(base) == 0
    out = capsys.readouterr()
    assert out.out == chat + "\n"
    assert "loaded in" in out.err  # (the "loading ..." line is for terminals only)
    assert main([*base, "--raw"]) == 0
    assert capsys.readouterr().out == raw + "\n"
    assert main([*base, "--raw", "--system", "be brief"]) == 2


def test_generate_ctrl_c_keeps_the_text_and_stats(tiny_dir, monkeypatch, capsys):
    from kvserve.entrypoints import llm as llm_mod

    real = llm_mod.LLM.generate_stream

    def interrupted(self, *a, **k):
        for i, out in enumerate(real(self, *a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(llm_mod.LLM, "generate_stream", interrupted)
    argv = ["generate", "hello", "--model", str(tiny_dir), *TINY, "--max-tokens", "20", "--ignore-eos",
            "--stats", "--raw"]
    assert main(argv) == 130
    out = capsys.readouterr()
    assert out.out.endswith("\n") and out.out.strip()
    assert "[3 tokens; time to first token" in out.err and "interrupted]" in out.err


@requires_smollm2
def test_generate_on_the_builtin_model_with_the_default_dtype():
    """What a new user types first: no --model, no --dtype. The built-in model is an instruct
    model: with its chat template it answers (the raw prompt gave an empty line)."""
    cmd = [sys.executable, "-m", "kvserve", "generate", "What is the capital of France?", "--max-tokens", "8",
           "--stats"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), proc.stderr
    assert "kvserve: smollm2 on cpu (float32" in proc.stderr  # auto: GGUF blocks computed in fp32
    assert "8 tokens; time to first token" in proc.stderr


# -- serve: signals ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("presses", [1, 2])
def test_serve_ctrl_c_exits_quietly_with_130(tiny_dir, presses):
    port = _free_port()
    cmd = [sys.executable, "-m", "kvserve", "serve", "--model", str(tiny_dir), *TINY, "--port", str(port),
           "--shutdown-timeout", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    slow = None
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.25)
        if presses == 2:
            # A request whose body never finishes keeps the first Ctrl-C's graceful shutdown waiting.
            slow = socket.create_connection(("127.0.0.1", port))
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\"")
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        if presses == 2:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if slow is not None:
            slow.close()
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "CancelledError" not in out, out
    if presses == 2:
        assert "second Ctrl-C" in out


# -- threads --------------------------------------------------------------------------------------
def test_threads_reach_torch_and_the_c_kernels(tiny_dir, monkeypatch):
    """One OpenMP runtime: LLM(threads=1) sets what the C kernels' omp_get_max_threads() sees."""
    import ctypes

    import torch

    from kvserve.kernels import cpu_quant

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        LLM(str(tiny_dir), device="cpu", dtype="float32", num_kv_blocks=8, threads=1)
        if cpu_quant.library() is None:
            pytest.skip("no C kernels here")
        assert torch.get_num_threads() == 1
        assert ctypes.CDLL("libgomp.so.1").omp_get_max_threads() == 1
        with open("/proc/self/maps") as f:  # ... and it is the runtime the C kernels run on
            assert len({line.split()[-1] for line in f if "libgomp" in line}) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        LLM(str(tiny_dir), device="cpu", threads=0)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import torch

    from kvserve.runner import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda: 0.0)
    assert cpu_threads.default_threads() == 8
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda: 2.6)
    assert cpu_threads.default_threads() == 5
    assert cpu_threads.default_threads(ranks=2) == 2
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda: 30.0)
    assert cpu_threads.default_threads() == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the program chose 3
    assert cpu_threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert cpu_threads.default_threads() == 6


def test_busy_cpus_counts_running_tasks_now(monkeypatch, tmp_path):
    """Busy CPUs come from the kernel's runnable-task count now (less this process), not from the
    1-minute load average, which still counts work that ended a minute ago."""
    from kvserve.runner import cpu_threads

    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nprocs_running 3\nprocs_blocked 0\n")
    assert cpu_threads.running_tasks(str(stat)) == 3
    assert cpu_threads.running_tasks(str(tmp_path / "missing")) is None
    counts = iter([1, 4, 1, 1, 9])  # this process alone, with a few blips
    monkeypatch.setattr(cpu_threads, "running_tasks", lambda: next(counts))
    monkeypatch.setattr(cpu_threads, "load_average", lambda: 5.0)  # stale: ignored
    assert cpu_threads.busy_cpus(interval=0) == 0.0
    monkeypatch.setattr(cpu_threads, "running_tasks", lambda: None)  # no /proc: the load average
    assert cpu_threads.busy_cpus(interval=0) == 5.0


# -- the KV cache fits the model and the context ----------------------------------------------------
def test_default_kv_cache_is_what_the_requests_can_use(tiny_dir, monkeypatch):
    from kvserve.runner import cpu_memory

    small = LLM(str(tiny_dir), device="cpu", dtype="float32", max_num_seqs=2, max_model_len=64, threads=1)
    assert small.engine.cache_config.num_blocks == 2 * 64 // 16 + 1
    assert small.engine.max_model_len == 64
    # Bounded by a fraction of the available RAM.
    monkeypatch.setattr(cpu_memory, "available_ram", lambda: 10 << 20)
    assert cpu_memory.default_kv_cache_bytes(1 << 40) == int(cpu_memory.KV_RAM_FRACTION * (10 << 20))
    for bad in (0, -(1 << 30)):
        with pytest.raises(ValueError, match="kv_cache_memory must be an integer >= 1"):
            LLM(str(tiny_dir), device="cpu", kv_cache_memory=bad)


# -- bench: sized for the device, a warning on a loaded machine ----------------------------------
def test_bench_defaults_follow_the_device():
    from kvserve.entrypoints.cli_bench import size_defaults

    parser = build_parser()
    cpu = parser.parse_args(["bench", "latency", "--device", "cpu"])
    size_defaults(cpu, "latency")
    assert (cpu.prompt_len, cpu.decode_tokens, cpu.repeats, cpu.peers) == (128, 32, 2, "llamacpp")
    gpu = parser.parse_args(["bench", "throughput", "--device", "cuda", "--scale", "0.5"])
    size_defaults(gpu, "throughput")
    assert (gpu.num_requests, gpu.scale) == (256, 0.5)  # an explicit value is kept


def test_bench_warns_when_the_load_exceeds_the_threads(capsys):
    from kvserve.entrypoints.cli_bench import load_warning

    class Monitor:
        def __init__(self, peak):
            self.peak = peak

        def stop(self):
            return self.peak

    assert load_warning(Monitor(1.2), threads=2) is None
    msg = load_warning(Monitor(3.7), threads=2)
    assert msg and "load average reached 3.7" in msg and "2 threads" in msg
    assert "WARNING" in capsys.readouterr().out


# -- start-up: the GGUF tokenizer is cached ---------------------------------------------------------
@requires_smollm2
def test_gguf_tokenizer_cache_round_trips(tmp_path, monkeypatch):
    from kvserve.loader import gguf
    from kvserve.loader.resolve import smollm2_path

    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    texts = ["Hello world! <|im_start|>user\nWhat is 2+2?<|im_end|>", "  tabs\tünïcödé 😀 12345 "]
    built = gguf.load_gguf_tokenizer(smollm2_path())
    (cached_file,) = (tmp_path / "tokenizers").iterdir()
    cached = gguf.load_gguf_tokenizer(smollm2_path())
    for t in texts:
        assert cached.encode(t) == built.encode(t)
        assert cached.decode(built.encode(t)) == built.decode(built.encode(t))
    assert (cached.bos_token, cached.eos_token, cached.chat_template) == (built.bos_token, built.eos_token, built.chat_template)
    cached_file.write_text("{broken")  # a damaged entry is rebuilt
    assert gguf.load_gguf_tokenizer(smollm2_path()).encode(texts[0]) == built.encode(texts[0])
    monkeypatch.setenv("KVSERVE_TOKENIZER_CACHE", "0")
    cached_file.unlink()
    gguf.load_gguf_tokenizer(smollm2_path())
    assert not cached_file.exists()
