"""Building and running FLARE deployments: job folders, site kits, the simulator."""
