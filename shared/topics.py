"""Kafka topics and the stages of an audit. One place, so producers, consumers,
manifests and tests agree."""

from __future__ import annotations

AUDIT_REQUESTED = "modelguard.audit.requested"
TRIGGERS_REVERSED = "modelguard.triggers.reversed"
NEURONS_SCORED = "modelguard.neurons.scored"
AUDIT_EVENTS = "modelguard.audit.events"
CARRIER_REQUESTED = "modelguard.carrier.requested"
CARRIER_READY = "modelguard.carrier.ready"
CARRIER_REVOKED = "modelguard.carrier.revoked"

ALL_TOPICS = (
    AUDIT_REQUESTED,
    TRIGGERS_REVERSED,
    NEURONS_SCORED,
    AUDIT_EVENTS,
    CARRIER_REQUESTED,
    CARRIER_READY,
    CARRIER_REVOKED,
)

# Stages of an audit, in report order.
STAGE_TRIGGER_REVERSAL = "trigger-reversal"
STAGE_NEURON_SCORING = "neuron-scoring"
STAGE_REPAIR = "repair"
STAGE_LEAK_DETECTOR = "leak-detector"
#: Run by trigger-reversal (where the gradient machinery lives) in a consumer group of its
#: own; only when the audit asks for it (a list of ε), else recorded as not run.
STAGE_ROBUSTNESS = "robustness"
# The stages that read audit.requested first, then the chain that follows the reversal.
AUDIT_STAGES = (
    STAGE_LEAK_DETECTOR,
    STAGE_TRIGGER_REVERSAL,
    STAGE_ROBUSTNESS,
    STAGE_NEURON_SCORING,
    STAGE_REPAIR,
)

# Job types (record header job-type).
JOB_AUDIT = "audit"
JOB_CARRIER = "carrier"
