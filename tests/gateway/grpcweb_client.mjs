// Real gRPC-Web clients against the gateway, run under Node by test_grpcweb.py:
// @connectrpc/connect-web (binary, fetch) and grpc-web (text, XMLHttpRequest
// through the xhr2 package). Message types come from a FileDescriptorSet that
// the test writes from the Python descriptor pool (no code generation).
//
//   node grpcweb_client.mjs <base-url> <descriptor-set-file> <bearer-token>
//
// Prints one JSON object per line: {"case": ..., ...outcome}.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createFileRegistry, fromBinary, toBinary, create } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { createClient, ConnectError } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

const require = createRequire(import.meta.url);
globalThis.XMLHttpRequest = require("xhr2");
const grpcWeb = require("grpc-web");

const [baseUrl, descriptorFile, token] = process.argv.slice(2);
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(descriptorFile)));
const service = registry.getService("echo.v1.EchoService");
const EchoRequest = registry.getMessage("echo.v1.EchoRequest");
const EchoResponse = registry.getMessage("echo.v1.EchoResponse");
const FailRequest = registry.getMessage("echo.v1.FailRequest");
const FailResponse = registry.getMessage("echo.v1.FailResponse");
const auth = { authorization: `Bearer ${token}` };

function out(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

async function connectCases() {
  const transport = createGrpcWebTransport({ baseUrl, useBinaryFormat: true });
  const client = createClient(service, transport);
  const reply = await client.echo({ text: "hello from connect-web" }, { headers: auth });
  out({ case: "binary-unary", text: reply.text });
  const texts = [];
  for await (const item of client.echoStream({ text: "s", repeat: 3 }, { headers: auth })) {
    texts.push(item.text);
  }
  out({ case: "binary-stream", texts });
  try {
    await client.fail({ error: "NotFoundError", message: "no such thing" });
    out({ case: "binary-error", code: 0 });
  } catch (error) {
    const e = ConnectError.from(error);
    out({ case: "binary-error", code: e.code, message: e.rawMessage });
  }
  try {
    await client.echo({ text: "x" });
    out({ case: "binary-unauthenticated", code: 0 });
  } catch (error) {
    out({ case: "binary-unauthenticated", code: ConnectError.from(error).code });
  }
}

function descriptor(name, type, requestSchema, responseSchema) {
  return new grpcWeb.MethodDescriptor(
    `/echo.v1.EchoService/${name}`,
    type,
    Object,
    Object,
    (request) => toBinary(requestSchema, create(requestSchema, request)),
    (bytes) => fromBinary(responseSchema, bytes),
  );
}

async function grpcWebTextCases() {
  const client = new grpcWeb.GrpcWebClientBase({ format: "text" });
  const echo = descriptor("Echo", grpcWeb.MethodType.UNARY, EchoRequest, EchoResponse);
  const reply = await client.unaryCall(
    `${baseUrl}/echo.v1.EchoService/Echo`, { text: "hello from grpc-web" }, auth, echo);
  out({ case: "text-unary", text: reply.text });
  const streamDescriptor = descriptor(
    "EchoStream", grpcWeb.MethodType.SERVER_STREAMING, EchoRequest, EchoResponse);
  const texts = await new Promise((resolve, reject) => {
    const got = [];
    const stream = client.serverStreaming(
      `${baseUrl}/echo.v1.EchoService/EchoStream`, { text: "t", repeat: 2 }, auth, streamDescriptor);
    stream.on("data", (item) => got.push(item.text));
    stream.on("error", reject);
    stream.on("end", () => resolve(got));
  });
  out({ case: "text-stream", texts });
  const fail = descriptor("Fail", grpcWeb.MethodType.UNARY, FailRequest, FailResponse);
  try {
    await client.unaryCall(
      `${baseUrl}/echo.v1.EchoService/Fail`, { error: "ConflictError", message: "try again" }, {}, fail);
    out({ case: "text-error", code: 0 });
  } catch (error) {
    out({ case: "text-error", code: error.code, message: error.message });
  }
}

try {
  await connectCases();
  await grpcWebTextCases();
} catch (error) {
  out({ case: "crash", error: String(error && error.stack ? error.stack : error) });
  process.exitCode = 1;
}
