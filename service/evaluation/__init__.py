"""Accuracy versus retention on labelled documents, relative to the unpruned model."""
