"""The node agent: probes the local web server and sends heartbeats."""
