# The one persistence call OCluster uses: `Admin.addClient` returns a Submission, on which
# the admin tool calls `save` to get the client's sturdy ref (a capnp:// URI as Text).
# The interface id is explicit and equal to C++'s /capnp/persistent.capnp and to
# capnp-rpc's, so that calls reach the same method on every implementation.
@0xd8a96a5ab6c2f9e4;

interface Persistent @0xc8cb212fcd9f5691 {
  save @0 (sealFor :AnyPointer) -> (sturdyRef :AnyPointer);
}
