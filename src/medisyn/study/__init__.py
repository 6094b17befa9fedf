"""Clinician reader study (paper sections 2.1 and 4.3.1-4.3.3; issue #15; docs/study.md).

``create`` builds a blinded study (synthetic images from a registered model version and real
test-split images, shuffled with a recorded seed, re-encoded identically, under random ids);
``app`` serves it to readers (personal links, one image at a time, answers stored at once);
``report`` computes accuracy, confidence, confusion matrices and Fleiss' kappa per origin and
logs them to MLflow on the model version; ``gate`` is the optional human approval gate.
"""
