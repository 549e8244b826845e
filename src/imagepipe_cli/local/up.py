"""`imagepipe up`: the local stack kept running on a fixed port, so any AWS client - the AWS CLI, boto3,
`imagepipe submit/status/results` - starts and follows jobs exactly as on AWS, until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from imagepipe_cli.local.runtime import REGION, STACK_NAME, LocalRuntime, RuntimeFailure, StackOptions
from imagepipe_cli.local.template import load_template

DEFAULT_PORT = 4566  # the port local AWS tools conventionally use


@dataclass
class UpOptions(StackOptions):
    port: int = DEFAULT_PORT
    state_dir: Path = Path(".imagepipe")


def up(options: UpOptions, out: TextIO | None = None, ready: list[str] | None = None) -> int:
    out = out or sys.stdout
    logs = options.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stopping: list[bool] = []
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a service manager, a test) stops it as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with LocalRuntime(load_template(options.template), options, logs, out, port=options.port) as runtime:
        endpoint = runtime.moto.url
        outputs = runtime.stack.outputs
        print(
            f"imagepipe is up: stack {STACK_NAME} at {endpoint} (moto server, region {REGION})\n"
            f"  input bucket:  s3://{outputs['InputBucketName']}/\n"
            f"  output bucket: s3://{outputs['OutputBucketName']}/\n"
            f"  use it like AWS, with any credentials (e.g. AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing):\n"
            f"    aws --endpoint-url {endpoint} --region {REGION} s3 cp prompts.csv s3://{outputs['InputBucketName']}/\n"
            f"    aws --endpoint-url {endpoint} --region {REGION} cloudformation describe-stacks --stack-name {STACK_NAME}\n"
            f"    AWS_ENDPOINT_URL={endpoint} imagepipe status\n"
            f"  logs: {logs}   Ctrl-C to stop",
            file=out,
            flush=True,
        )
        if ready is not None:
            ready.append(endpoint)
        try:
            while not stopping:
                try:
                    for delivery in runtime.pump():
                        for job in (delivery.result or {}).get("jobs", []):
                            print(
                                f"job {job['job_id']}: {job['status']} ({job['queued']} rows queued)",
                                file=out,
                                flush=True,
                            )
                    for event in runtime.completions():
                        print(_completed_line(event, outputs["OutputBucketName"]), file=out, flush=True)
                except RuntimeFailure as exc:
                    if runtime.stopped():
                        print(f"imagepipe: error: {exc} (see {logs})", file=sys.stderr, flush=True)
                        return 3
                    # A file the splitter could not take is that upload's problem, not the stack's.
                    print(f"imagepipe: {exc} (see {logs})", file=sys.stderr, flush=True)
                time.sleep(0.25)
        except KeyboardInterrupt:
            pass
        print("imagepipe: stopping the local stack", file=out, flush=True)
    return 0


def _completed_line(event: dict, output_bucket: str) -> str:
    detail = event.get("detail") or {}
    counts = detail.get("counts") or {}
    done = ", ".join(f"{value} {name}" for name, value in counts.items() if name != "total" and value)
    return (
        f"job {detail.get('job_id')}: {str(detail.get('status')).replace('_', ' ')} - {done or 'no rows'}, "
        f"${float(detail.get('cost') or 0):.4f} - s3://{output_bucket}/jobs/{detail.get('job_id')}/"
    )
