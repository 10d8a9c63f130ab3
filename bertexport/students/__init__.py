"""Smaller models made from a teacher: shapes and width pruning, distillation and its losses, data expansion."""
