"""The routing header and retry policy our clients send (what a fleet's proxy routes on)."""
import json

from server.client.routing import (ADAPTER_HEADER, CHANNEL_OPTIONS, call_status, routing_headers, routing_key,
                                   routing_metadata)


def test_the_key_is_the_adapter_name_without_its_version():
    assert routing_key("support@3") == "support" and routing_key("support@latest") == "support"
    assert routing_metadata("support@3") == [(ADAPTER_HEADER, "support")]
    assert ADAPTER_HEADER == "x-loraserve-adapter"
    assert routing_headers("support@3") == {ADAPTER_HEADER: "support"} and routing_headers("") == {}


def test_no_header_for_the_base_model_or_an_unsendable_id():
    assert routing_metadata("") == []
    assert routing_metadata("caf\u00e9") == []      # gRPC metadata must be ASCII; the server refuses it anyway
    assert routing_metadata("a\nb") == [] and routing_metadata("x" * 200) == []


def test_only_inference_calls_are_retried_and_only_on_unavailable():
    opts = dict(CHANNEL_OPTIONS)
    assert opts["grpc.enable_retries"] == 1
    (method,) = json.loads(opts["grpc.service_config"])["methodConfig"]
    assert method["name"] == [{"service": "loraserve.v1.Inference"}]  # never an adapter upload
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] <= 5


def test_a_stream_the_proxy_cut_short_is_unavailable_and_says_so():
    """HAProxy ends a stream whose replica died without a gRPC status; gRPC calls that UNKNOWN."""
    code, details = call_status("UNKNOWN", "Stream removed (Data frame with END_STREAM flag received)")
    assert code == "UNAVAILABLE" and "cut short" in details and "retry" in details and "END_STREAM" in details
    assert call_status("UNKNOWN", "something else") == ("UNKNOWN", "something else")
    assert call_status("NOT_FOUND", "adapter 'x' not found") == ("NOT_FOUND", "adapter 'x' not found")
