"""From a spec to a plan: the target and tuning records, the entry points as data, and
the plan that fixes every decision the C templates render."""
