"""dilattn-client's commands against a running server: Triton's integer parameters, sizes and
flags it must refuse itself, and a stream the server ends."""

import os
import pathlib
import subprocess

import pytest

from conftest import ServerProcess

BINARY = os.environ.get("DILATTN_CLIENT_BIN", str(
    pathlib.Path(__file__).resolve().parents[2] / "build" / "client" / "dilattn-client"))
SMALL = ["--param", "segment_lengths=64,128", "--param", "dilation_rates=1,2"]


def _run(*args, timeout=60):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=timeout)


def test_priority_and_timeout_go_out_as_integers(server):
    """The server takes Triton's `priority` and `timeout` only as integers; the CLI's --param
    text is sent as one (and, for attend, the priority goes in the native header's field)."""
    for command in ("infer", "attend"):
        done = _run(command, "--url", server.url, "--shape", "1,256,2,16", *SMALL,
                    "--param", "priority=1")
        assert done.returncode == 0, done.stderr
    done = _run("infer", "--url", server.url, "--shape", "1,256,2,16", *SMALL,
                "--param", "timeout=100000000")
    assert done.returncode == 0, done.stderr
    for bad in ("priority=high", "timeout=-5", "timeout=1.5"):
        done = _run("infer", "--url", server.url, "--shape", "1,256,2,16", *SMALL, "--param", bad)
        assert done.returncode != 0 and bad.split("=")[0] in done.stderr, done.stderr


@pytest.mark.parametrize("args,needle", [
    (["infer", "--shape", "1,100000000000,8,64"], "more than one message can carry"),
    (["infer", "--shape", "1,4611686018427387904,8,64"], "overflows a byte count"),
    (["bench", "--shape", "1,256,2,16", "--duration", "nan"], "duration"),
    (["bench", "--shape", "1,256,2,16", "--duration", "inf"], "duration"),
    (["attend", "--shape", "1,256,2,16", "--chunk-mib", "nan"], "chunk-mib"),
])
def test_the_client_refuses_what_it_cannot_send(server, args, needle):
    """Refused with a message and exit status 2, before anything is allocated or sent (an
    oversized shape was a std::bad_alloc abort, or wrapped to a wrong size; NaN durations never
    ended)."""
    done = _run(*args, "--url", server.url, *SMALL, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert needle in done.stderr, done.stderr


def test_bench_stream_survives_a_stream_the_server_ends():
    """A server whose message limit is below the request's size ends each stream; the client
    reports it and exits, where a second Finish on the ended stream aborted the process."""
    s = ServerProcess("--max-message-bytes", "4096", name="tiny-messages-cli")
    try:
        done = _run("bench", "--url", s.url, "--stream", "--shape", "1,256,2,16", *SMALL,
                    "--duration", "1", "--concurrency", "2")
        assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr}"
        assert "stopped early" in done.stdout + done.stderr, done.stdout + done.stderr
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], ["infer", "--help"]])
def test_help_prints_the_usage_and_succeeds(args):
    """Asked for, the usage goes to stdout with exit status 0 (--help was an unknown command,
    exit 2); a wrong command line still gets it on stderr with exit status 2."""
    done = _run(*args, timeout=30)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.startswith("usage: dilattn-client"), done.stdout
    assert done.stderr == ""
    done = _run("--bogus", timeout=30)
    assert done.returncode == 2
    assert "unknown command '--bogus'" in done.stderr and "usage:" in done.stderr
    assert done.stdout == ""
