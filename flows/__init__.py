"""Prefect flows that wire the ``pipeline`` stage functions (no side effects at import).

Names shared by the deployments (``flows/deploy.py``), the CLI and flows that trigger
other flows (monitoring → training with ``run_deployment``: ``monitor.training_deployment``
must equal :data:`TRAINING_DEPLOYMENT`; a unit test checks it)."""

TRAINING_FLOW = "xrayops-training"
MONITORING_FLOW = "xrayops-monitoring"
FEEDBACK_FLOW = "xrayops-feedback"
TRAINING_DEPLOYMENT = f"{TRAINING_FLOW}/training"
MONITORING_DEPLOYMENT = f"{MONITORING_FLOW}/monitoring"
FEEDBACK_DEPLOYMENT = f"{FEEDBACK_FLOW}/feedback"
PACS_FLOW = "xrayops-pacs-inference"
PACS_DEPLOYMENT = f"{PACS_FLOW}/pacs"  # for pacs.dispatch: deployment (set pacs.deployment to it)
