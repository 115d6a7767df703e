"""trigger-reversal: reverse-engineers a candidate backdoor trigger for every label
(batched Neural Cleanse) and flags the labels whose trigger is abnormally small (MAD)."""
