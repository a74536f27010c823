"""The live service: Faust app, session store, tagging, revisions, hot swap, metrics, local stack."""
