"""Pieces every stage and target shares: quality metrics and the token windows they are measured on."""
