"""The feedback flow: adjudicated clinician feedback → a new labelled dataset version (DVC) + accuracy report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from pipeline.config import Settings, load_settings, with_overrides


class FeedbackParameters(BaseModel):
    """What a person can change when starting a feedback run."""

    overrides: list[str] = Field(default_factory=list, title="Other settings",
                                 description="section.field=value strings, e.g. data.dvc_push=false.")
    params_path: str | None = Field(None, title="params.yaml path", description="Empty = the project's params.yaml.")

    def settings(self) -> Settings:
        return with_overrides(load_settings(self.params_path), self.overrides)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass on a second try (a DVC remote, a file system), not feedback or settings that
    are wrong (an unknown label, a bad override): those fail the same way every time."""
    from pipeline.errors import ConfigError, FeedbackError

    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (FeedbackError, ConfigError))


@task(name="ingest-feedback", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 4],
      retry_condition_fn=_transient)
def ingest(settings: Settings) -> dict[str, Any]:
    from pipeline.monitoring.feedback import ingest_feedback

    summary = ingest_feedback(settings)
    if summary["skipped_parts"]:
        get_run_logger().warning("skipped %d unreadable feedback record file(s): %s", summary["skipped_parts"],
                                 ", ".join(summary["skipped_files"][:3]))
    get_run_logger().info("feedback: %s records → %s; dataset version %s", summary["records"],
                          summary["images_by_label"], (summary.get("dvc") or {}).get("dvc_md5"))
    return summary


@flow(name="xrayops-feedback", log_prints=True)
def feedback_flow(params: FeedbackParameters | None = None) -> dict[str, Any]:
    """Turn adjudicated feedback into a DVC-versioned dataset and report accuracy per model version."""
    from pipeline.monitoring.feedback import summary_markdown

    settings = (params or FeedbackParameters()).settings()
    summary = ingest(settings)
    create_markdown_artifact(summary_markdown(summary), key="feedback-summary", description="Clinician feedback")
    return summary


def run(params: FeedbackParameters) -> dict[str, Any]:
    return feedback_flow(params)
