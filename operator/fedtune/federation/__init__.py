"""The round protocol: layout and markers (protocol), the aggregator loop and the client loop."""
