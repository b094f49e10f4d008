"""bert_demo: minBERT multitask fine-tuning, the reference consumer of gradtools."""
