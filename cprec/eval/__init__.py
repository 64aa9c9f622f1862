"""Next-item recommendation evaluation: metrics, LLM scoring (sampled and full ranking), SASRec."""
