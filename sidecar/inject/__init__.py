"""Sidecar injection for Kubernetes: which pods get an Opus sidecar, and what it adds.

`patch` builds the JSON Patch (shared), `webhook` serves it as a mutating admission
webhook, `offline` applies it to YAML files (`opus-sidecar inject`), `cert` makes the
webhook's TLS certificates, and `command` is their command-line front.
"""
