"""Running a deployed function's handler locally the way Lambda does: code from the function's CodeUri,
the environment the stack gave it, a context object, and one invocation at a time per environment."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from imagepipe_cli.local.stack import DeployedFunction


class FunctionError(Exception):
    """The handler raised: Lambda reports this as a function error (the whole event failed)."""

    def __init__(self, function: str, error_type: str, message: str) -> None:
        super().__init__(function, error_type, message)
        self.function, self.error_type, self.message = function, error_type, message

    def __str__(self) -> str:
        return f"{self.function} failed: {self.error_type}: {self.message}"


@dataclass
class LambdaContext:
    function_name: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    aws_request_id: str
    deadline: float
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = "local"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.time()) * 1000))


def make_context(function: DeployedFunction, region: str = "us-east-1") -> LambdaContext:
    return LambdaContext(
        function_name=function.name,
        memory_limit_in_mb=function.memory,
        invoked_function_arn=f"arn:aws:lambda:{region}:123456789012:function:{function.name}",
        aws_request_id=str(uuid.uuid4()),
        deadline=time.time() + function.timeout,
        log_group_name=f"/aws/lambda/{function.name}",
    )


def load_handler(code_dir: Path, handler: str, module_name: str | None = None) -> Callable[[dict, Any], Any]:
    """Import `module.function` from the function's code folder, as Lambda's bootstrap does.

    module_name lets two functions whose modules are both `app` live in one process (tests)."""
    module_path, _, function_name = handler.rpartition(".")
    source = code_dir / (module_path.replace(".", "/") + ".py")
    name = module_name or module_path
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"handler module {source} not found")
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, function_name)


class InlineFunction:
    """The handler called in this process, one event at a time, with the function's environment
    set for the call (tests: works under moto's in-process mock_aws)."""

    def __init__(
        self,
        function: DeployedFunction,
        region: str = "us-east-1",
        env_overrides: dict | None = None,
        module_name: str | None = None,
    ) -> None:
        self.function, self.region = function, region
        self._env = {**function.env, **(env_overrides or {})}
        self._lock = threading.Lock()
        self._handler = load_handler(
            function.code_dir, function.handler, module_name or f"local_{function.logical_id}"
        )

    def invoke(self, event: dict) -> Any:
        with self._lock, _environment(self._env):
            try:
                result = self._handler(
                    json.loads(json.dumps(event)), make_context(self.function, self.region)
                )
            except Exception as exc:
                raise FunctionError(self.function.logical_id, type(exc).__name__, str(exc)) from exc
        return json.loads(json.dumps(result))

    def close(self) -> None:
        pass


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ProcessFunction:
    """Up to `concurrency` execution environments, each a separate process with the function's own
    environment variables and module state, handling one event at a time - like Lambda. An invocation that
    runs past the function's Timeout is killed with its environment ("Task timed out after N.NN seconds", a
    function error); the next invocation gets a new environment (a cold start)."""

    def __init__(
        self,
        function: DeployedFunction,
        *,
        concurrency: int,
        env_overrides: dict[str, str],
        log_path: Path,
        region: str,
        init_timeout_s: float = 120.0,
    ) -> None:
        self.function, self.region = function, region
        # What Lambda bills: handler time per invocation, plus each environment's init phase (billed for
        # on-demand functions since August 2025), which init_s also counts apart.
        self.invocations, self.billed_s, self.init_s = 0, 0.0, 0.0
        self.failures = 0  # invocations that raised, timed out or were killed by --chaos
        self.timeouts = 0  # invocations killed at the function's Timeout
        self.cold_starts = 0
        self._lock = threading.Lock()
        self._env = {**function.env, **env_overrides}
        self._log_path, self._init_timeout_s = log_path, init_timeout_s
        self._idle: list[_Environment] = []
        self._all: set[_Environment] = set()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._closed = False

    def invoke(self, event: dict) -> Any:
        with self._slots:
            environment = self._take()
            context = make_context(self.function, self.region)
            outcome = environment.invoke(self.function, event, context)
            with self._lock:
                self.invocations += 1
                self.billed_s += outcome.seconds
                self.failures += outcome.error is not None
                self.timeouts += outcome.timed_out
                if environment.alive and not self._closed:
                    self._idle.append(environment)
                else:
                    self._all.discard(environment)
            if not environment.alive:
                environment.stop()
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def _take(self) -> _Environment:
        with self._lock:
            if self._closed:
                raise FunctionError(
                    self.function.logical_id, "Runtime.Closed", "the local runtime is stopping"
                )
            if self._idle:
                return self._idle.pop()
            self.cold_starts += 1
        environment = _Environment(
            str(self.function.code_dir), self.function.handler, self._env, str(self._log_path)
        )
        with self._lock:
            self._all.add(environment)
        started = time.monotonic()
        try:
            environment.wait_ready(self.function.logical_id, self._init_timeout_s)
        except FunctionError:
            with self._lock:
                self._all.discard(environment)
            environment.stop()
            raise
        finally:
            with self._lock:
                init_s = time.monotonic() - started
                self.init_s += init_s
                self.billed_s += init_s
        return environment

    def close(self) -> None:
        with self._lock:
            self._closed = True
            environments = list(self._all)
            self._idle.clear()
        for environment in environments:
            environment.stop()


# Libraries every function imports and that read none of a function's settings at import. A new
# environment is forked from a server process that has imported them once, instead of each importing
# them again (about a second of CPU each, ten at once on a cold start): its own module state, environment
# variables and handler import (Lambda's init phase) stay its own. botocore's data files are parsed there
# once, and compiled bytecode is kept (preload.py): a generator's init then takes 0.2 s of CPU, not 0.56 s.
PRELOAD = [
    "boto3",
    "httpx",
    "httpcore",  # httpx imports it with the first client: ~20 ms of each environment's init
    "pydantic",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.parser",
    "aws_xray_sdk.core",  # Powertools' Tracer imports it even with tracing off
    "imagepipe_cli.local.preload",
    "imagepipe_cli.local.lambda_runtime",
]
_context_lock = threading.Lock()


def _process_context() -> Any:
    with _context_lock:
        if "forkserver" not in multiprocessing.get_all_start_methods():
            return multiprocessing.get_context("spawn")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context


class _Environment:
    """One execution environment: a worker process that runs the init phase, then one event at a time."""

    def __init__(self, code_dir: str, handler: str, env: dict[str, str], log_path: str) -> None:
        context = _process_context()
        self._conn, child = context.Pipe()
        self._log_path = log_path
        self._process = context.Process(
            target=_environment_main,
            args=(child, code_dir, handler, env, log_path),
            daemon=True,
        )
        self._process.start()
        child.close()
        self.alive = True

    def wait_ready(self, logical_id: str, timeout_s: float) -> None:
        try:
            ready = self._conn.poll(timeout_s) and self._conn.recv()
        except (EOFError, OSError):
            ready = False
        if ready != "ready":
            self.alive = False
            raise FunctionError(
                logical_id,
                "Runtime.InitError",
                f"the execution environment did not start (see {self._log_path})",
            )

    def invoke(self, function: DeployedFunction, event: dict, context: LambdaContext) -> _Outcome:
        started = time.monotonic()
        try:
            self._conn.send((function.logical_id, event, context))
            if self._conn.poll(max(0.0, context.deadline - time.time())):
                return self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.alive = False
            return _Outcome(
                None,
                time.monotonic() - started,
                FunctionError(function.logical_id, "Runtime.ExitError", "the execution environment exited"),
            )
        # Past the function's Timeout: Lambda stops the invocation and discards the environment.
        self.alive = False
        self._process.kill()
        seconds = time.monotonic() - started
        message = f"Task timed out after {function.timeout:.2f} seconds"
        with open(self._log_path, "a", encoding="utf-8") as log:
            log.write(f"{datetime.now(UTC).isoformat()} {context.aws_request_id} {message}\n")
        return _Outcome(None, seconds, FunctionError(function.logical_id, "Sandbox.Timedout", message), True)

    def stop(self) -> None:
        self.alive = False
        if self._process.is_alive():
            with suppress(OSError, BrokenPipeError):
                self._conn.send(None)
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
        self._process.join(timeout=5)
        self._conn.close()


def _environment_main(conn: Any, code_dir: str, handler: str, env: dict[str, str], log_path: str) -> None:
    _start_environment(code_dir, handler, env, log_path)
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        conn.send(_invoke(*request))


@dataclass
class _Outcome:
    result: Any
    seconds: float
    error: FunctionError | None = None
    timed_out: bool = False


_HANDLER: Callable[[dict, Any], Any] | None = None


class ChaosCrash(BaseException):
    """The local runtime killing an invocation on purpose (`--chaos crash-after-call=P`): a
    BaseException, so no handler code catches it, like a Lambda timeout."""


def _crash_after_calls(probability: float) -> None:
    """Every provider call that got an answer may be followed by the invocation dying, before the
    answer is recorded or the message deleted."""
    import random

    from imagepipe.providers import base

    answered, rng = base.Provider.run, random.Random()

    def run(self: Any, call: Callable[[], Any]) -> Any:
        result = answered(self, call)
        if rng.random() < probability:
            raise ChaosCrash("chaos: the invocation died after the API answered")
        return result

    base.Provider.run = run  # type: ignore[method-assign]


def _start_environment(code_dir: str, handler: str, env: dict[str, str], log_path: str) -> None:
    """Runs once in each new worker process: Lambda's init phase."""
    global _HANDLER
    os.environ.update(env)
    # multiprocessing imports the parent's __main__ (the CLI) into every new process, and with it the shared
    # package, whose Powertools Logger/Metrics read their settings at import - before the line above. The
    # init phase imports the layer afresh with the function's environment, as Lambda does.
    for name in [name for name in sys.modules if name == "imagepipe" or name.startswith("imagepipe.")]:
        del sys.modules[name]
    if float(env.get("IMAGEPIPE_CHAOS_CRASH_AFTER_CALL") or 0):
        _crash_after_calls(float(env["IMAGEPIPE_CHAOS_CRASH_AFTER_CALL"]))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # the function's stdout/stderr (Powertools' JSON logs) go to its log file
    os.dup2(log, 2)
    sys.path.insert(0, code_dir)  # LAMBDA_TASK_ROOT is on the path in Lambda
    _HANDLER = load_handler(Path(code_dir), handler)


def _invoke(logical_id: str, event: dict, context: LambdaContext) -> _Outcome:
    assert _HANDLER is not None
    started = time.monotonic()
    try:
        result = json.loads(json.dumps(_HANDLER(event, context)))
        return _Outcome(result, time.monotonic() - started)
    except (Exception, ChaosCrash) as exc:
        traceback.print_exc()
        sys.stderr.flush()
        return _Outcome(
            None, time.monotonic() - started, FunctionError(logical_id, type(exc).__name__, str(exc))
        )
