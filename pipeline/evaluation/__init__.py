"""Stage `evaluate`: clinical metrics, patient-level bootstrap, operating point, plots, Grad-CAM."""
