"""The clinician app (Streamlit): ``xrayops ui`` runs :mod:`pipeline.ui.app`."""
