"""Serving: the input gate (``admission``), the model store that polls the alias and loads only
versions the registry vouches for (``model_store`` + the pure rule in ``trust``), the inference
service shared by the FastAPI app and the clinician UI, and the FastAPI app itself (``app``)."""
