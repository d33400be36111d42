"""Fine-tuning an exported model for cell classification: labels, classifier model, data, task and export.

finetune.py assembles these and hands them to the shared training loop (training/run.py).
"""
