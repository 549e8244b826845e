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
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
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
    environment variables and module state, handling one event at a time - like Lambda."""

    def __init__(
        self,
        function: DeployedFunction,
        *,
        concurrency: int,
        env_overrides: dict[str, str],
        log_path: Path,
        region: str,
    ) -> None:
        self.function, self.region = function, region
        self.invocations, self.billed_s = 0, 0.0  # what Lambda would bill: handler time per invocation
        self.failures = 0  # invocations that raised (or were killed by --chaos)
        self._lock = threading.Lock()
        env = {**function.env, **env_overrides}
        self._pool = ProcessPoolExecutor(
            max_workers=concurrency,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_environment,
            initargs=(str(function.code_dir), function.handler, env, str(log_path)),
        )

    def invoke(self, event: dict) -> Any:
        outcome = self._pool.submit(
            _invoke, self.function.logical_id, event, make_context(self.function, self.region)
        ).result()
        with self._lock:
            self.invocations += 1
            self.billed_s += outcome.seconds
            self.failures += outcome.error is not None
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Outcome:
    result: Any
    seconds: float
    error: FunctionError | None = None


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
