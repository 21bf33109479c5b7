"""Evaluation: the metric definitions (`metrics`, the one place they live), reconstruction
evaluation of dictionaries on a store (`reconstruction`), reports (`report`); splice evaluation
(`splice`) when installed. See docs/training.md."""
