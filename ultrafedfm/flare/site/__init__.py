"""FLARE adapters run by a site's FLARE client."""
