"""Stage `monitor`: Evidently drift reports, simulated traffic, clinician feedback."""
