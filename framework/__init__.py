"""Microservice patterns on gRPC for asyncio Python."""
