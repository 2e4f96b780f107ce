"""A stand-in for the parts of the AUTOMATIC1111 WebUI's ``modules`` package we use (see shared HOST_API.md).

It mirrors the real signatures and behaviour of v1.10.1 closely enough to test our host adapter: callbacks are
recorded in lists as the WebUI does, options are registered with the same OptionInfo fields, paths follow the
WebUI's layout under a temporary data dir set by the test.
"""
