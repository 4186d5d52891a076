"""Preference-data builders for vision-language models: BDHS, MIA-DPO, rDPO; each writes TRL rows and a report."""
