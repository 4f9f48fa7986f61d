"""Stages `register` + `promote`: registry contract, versions, the promotion gate, model cards, exports."""
