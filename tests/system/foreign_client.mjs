// A foreign client: Node's @grpc/grpc-js (from npm), knowing only the .proto contracts.
// It asks the registry where user.v1.UserService runs, checks that instance's standard
// health, registers and logs a user in, and prints what it saw as one JSON line.
//
//   node foreign_client.mjs REGISTRY_ADDRESS PROTOS_DIR HEALTH_PROTO EMAIL
//   env: GRPCJS_DIR (where @grpc/grpc-js and @grpc/proto-loader are installed),
//        REGISTRY_TOKEN (bearer token with registry:read)
import { createRequire } from "node:module";

const require = createRequire(`${process.env.GRPCJS_DIR}/`);
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [registryAddress, protos, healthProto, email] = process.argv.slice(2);
const options = { keepCase: true, longs: String, enums: String, defaults: true, includeDirs: [protos] };
const load = (file) => grpc.loadPackageDefinition(loader.loadSync(file, options));

const registry = load("registry/v1/registry.proto").registry.v1;
const user = load("user/v1/user.proto").user.v1;
const health = grpc.loadPackageDefinition(loader.loadSync(healthProto, options)).grpc.health.v1;

const call = (client, method, request, metadata = new grpc.Metadata()) =>
  new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 10000 }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });

const bearer = new grpc.Metadata();
bearer.add("authorization", `Bearer ${process.env.REGISTRY_TOKEN}`);
const creds = grpc.credentials.createInsecure();
const result = {};
try {
  const directory = new registry.RegistryService(registryAddress, creds);
  const view = await call(directory, "Discover", { service: "user.v1.UserService" }, bearer);
  result.address = view.instances[0].address;
  const checker = new health.Health(result.address, creds);
  result.health = (await call(checker, "Check", { service: "" })).status;
  const users = new user.UserService(result.address, creds);
  const keyed = new grpc.Metadata();
  keyed.add("idempotency-key", `node-${email}`);
  const registered = await call(
    users, "RegisterUser", { email, display_name: "Node", password: "from node 123" }, keyed,
  );
  result.user_id = registered.user.user_id;
  const logged = await call(users, "LogIn", { email, password: "from node 123" });
  result.token_type = logged.token_type;
  result.scopes = logged.scopes;
  try {
    await call(users, "GetUser", { user_id: result.user_id });
  } catch (error) {
    result.anonymous_get = error.code; // UNAUTHENTICATED = 16
  }
  const authorized = new grpc.Metadata();
  authorized.add("authorization", `Bearer ${logged.access_token}`);
  result.me = (await call(users, "GetUser", { user_id: result.user_id }, authorized)).user.email;
} catch (error) {
  result.error = `${error.code}: ${error.details ?? error.message}`;
}
console.log(JSON.stringify(result));
