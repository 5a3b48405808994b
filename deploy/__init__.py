"""Launching and supervising a deployment: `slos-serve serve` (planner daemon, engines, HTTP
front door) on one machine as processes, or with engines as Ray actors across machines
(docs/DEPLOYMENT.md)."""
