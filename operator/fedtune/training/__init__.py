"""Model, tokenizer and data loading, PEFT set-up, local training and evaluation."""
