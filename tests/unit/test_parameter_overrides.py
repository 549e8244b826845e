"""The local stack is configured like the deployed one: `--parameter-overrides K=V ...` and samconfig.toml's
parameter_overrides, as `sam deploy` takes them, checked as CloudFormation checks them."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from imagepipe_cli import cli
from imagepipe_cli.local.runtime import RuntimeSetupError, StackOptions, stack_parameters
from imagepipe_cli.local.stack import deploy_stack
from imagepipe_cli.local.template import Template, load_template

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def template(tmp_path: Path) -> Template:
    """template.yaml's body in a folder of its own, for a samconfig.toml beside it."""
    return Template(tmp_path / "template.yaml", load_template(ROOT / "template.yaml").body)


def _samconfig(template: Template, text: str) -> None:
    (template.base_dir / "samconfig.toml").write_text(text, encoding="utf-8")


def test_without_overrides_the_template_defaults_apply(template):
    values = stack_parameters(template, StackOptions())
    assert values["LogLevel"] == "INFO" and values["DefaultProvider"] == "atlascloud"


def test_flags_beat_overrides_which_beat_samconfig_which_beats_the_template(template):
    _samconfig(
        template,
        'version = 0.1\n[default.deploy.parameters]\nregion = "us-east-1"\nconfirm_changeset = true\n'
        'parameter_overrides = "LogLevel=WARNING GeneratorBatchSize=5 DefaultProvider=qianfan"\n',
    )
    options = StackOptions(
        parameter_overrides=["GeneratorBatchSize=4", "DefaultProvider=openai"], batch_size=3, provider=None
    )

    values = stack_parameters(template, options)

    assert values["LogLevel"] == "WARNING"  # samconfig.toml over the template
    assert values["DefaultProvider"] == "openai"  # --parameter-overrides over samconfig.toml
    assert values["GeneratorBatchSize"] == "3"  # --batch-size over --parameter-overrides


def test_the_config_env_picks_the_samconfig_section_and_a_missing_one_is_fine(template):
    _samconfig(template, '[staging.deploy.parameters]\nparameter_overrides = ["LogLevel=DEBUG"]\n')

    assert stack_parameters(template, StackOptions(config_env="staging"))["LogLevel"] == "DEBUG"
    assert stack_parameters(template, StackOptions(config_env="prod"))["LogLevel"] == "INFO"
    assert stack_parameters(template, StackOptions())["LogLevel"] == "INFO"


def test_the_projects_own_samconfig_with_deploy_only_settings_does_not_break_a_local_run():
    values = stack_parameters(load_template(ROOT / "template.yaml"), StackOptions())
    assert values["DefaultProvider"] == "atlascloud"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("NoSuchParameter=1", "NoSuchParameter is not a parameter of template.yaml"),
        ("LogLevel=LOUD", "LogLevel='LOUD' must be one of DEBUG, INFO, WARNING, ERROR"),
        ("GeneratorBatchSize=11", "GeneratorBatchSize='11' must be between 1 and 10"),
        ("GeneratorBatchSize=ten", "GeneratorBatchSize='ten' is not a number"),
        ("LogLevel", "'LogLevel' is not NAME=VALUE"),
    ],
)
def test_an_override_the_template_does_not_allow_is_one_line(template, override, message):
    with pytest.raises(RuntimeSetupError) as caught:
        stack_parameters(template, StackOptions(parameter_overrides=[override]))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_unknown_parameter_in_samconfig_is_refused_too(template):
    _samconfig(template, '[default.deploy.parameters]\nparameter_overrides = "Nope=1"\n')
    with pytest.raises(RuntimeSetupError, match=r"samconfig.toml \[default.deploy.parameters\]: Nope"):
        stack_parameters(template, StackOptions())


def test_imagepipe_run_refuses_an_unknown_override_with_one_line_and_exit_2(tmp_path, capsys):
    rows = tmp_path / "prompts.csv"
    rows.write_text("id,prompt\n1,a cat\n", encoding="utf-8")

    code = cli.main(
        [
            "run",
            str(rows),
            "--out",
            str(tmp_path / "out"),
            "--template",
            str(ROOT / "template.yaml"),
            "--parameter-overrides",
            "NoSuchParameter=1",
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("imagepipe: error: --parameter-overrides: NoSuchParameter is not a parameter")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_overrides_reach_the_deployed_functions_environment(template):
    parameters = stack_parameters(
        load_template(ROOT / "template.yaml"), StackOptions(parameter_overrides=["LogLevel=DEBUG"])
    )
    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        stack = deploy_stack(
            lambda name: session.client(name, region_name="us-east-1"),
            load_template(ROOT / "template.yaml"),
            stack_name="overrides",
            parameters=parameters,
            region="us-east-1",
        )
    envs = [fn.env for fn in stack.functions.values()]
    assert envs and all(env["POWERTOOLS_LOG_LEVEL"] == "DEBUG" for env in envs)


def test_max_attempts_sets_task_max_attempts_and_is_checked_against_its_range(template):
    assert stack_parameters(template, StackOptions(max_attempts=12))["TaskMaxAttempts"] == "12"
    with pytest.raises(RuntimeSetupError, match="--max-attempts: TaskMaxAttempts='1000' must be between"):
        stack_parameters(template, StackOptions(max_attempts=1000))


def test_the_generators_timeout_comes_from_its_parameter_and_the_runtime_enforces_that(template):
    parameters = stack_parameters(
        load_template(ROOT / "template.yaml"),
        StackOptions(parameter_overrides=["GeneratorTimeoutSeconds=45"]),
    )
    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        stack = deploy_stack(
            lambda name: session.client(name, region_name="us-east-1"),
            load_template(ROOT / "template.yaml"),
            stack_name="timeouts",
            parameters=parameters,
            region="us-east-1",
        )
    assert stack.functions["ImageGeneratorFunction"].timeout == 45  # what ProcessFunction kills at
