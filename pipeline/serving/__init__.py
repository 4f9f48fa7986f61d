"""Serving: the input gate, the model store (alias polling), the inference service shared by the
FastAPI app and the clinician UI, and the FastAPI app itself (:mod:`pipeline.serving.app`)."""
