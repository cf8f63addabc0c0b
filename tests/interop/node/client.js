// A Node.js client of the example estate: unary, server streaming, bidi and a rich error.
// Usage: node client.js ADDRESS PROTOS_DIR GOOGLEAPIS_DIR SESSION; prints one JSON document.
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [address, protos, googleapis, session] = process.argv.slice(2);
const options = { keepCase: false, longs: String, enums: String, defaults: false, oneofs: true,
                  includeDirs: [protos, googleapis] };
const shop = grpc.loadPackageDefinition(
  loader.loadSync(["shop/v1/inventory.proto", "shop/v1/payments.proto", "shop/v1/orders.proto"], options)).shop.v1;
const statusType = loader.loadSync("google/rpc/status.proto", options)["google.rpc.Status"];

function md(scenario) {
  const m = new grpc.Metadata();
  m.set("x-virtsvc-scenario", scenario);
  m.set("x-virtsvc-session", session);
  return m;
}

const creds = grpc.credentials.createInsecure();
const inventory = new shop.Inventory(address, creds);
const payments = new shop.Payments(address, creds);
const orders = new shop.Orders(address, creds);
const out = {};

function unary() {
  return new Promise((resolve) => inventory.Reserve({ sku: "ABC-1", qty: 3 }, md("checkout-happy"), (err, reply) => {
    out.reserve = err ? { error: err.code } : reply;
    resolve();
  }));
}

function streaming() {
  return new Promise((resolve) => {
    const events = [];
    const call = inventory.Watch({ skus: ["ABC-1"] }, md("inventory-watch"));
    call.on("data", (e) => events.push(e));
    call.on("error", (err) => { out.watch = { error: err.code }; resolve(); });
    call.on("end", () => { out.watch = events; resolve(); });
  });
}

function bidi() {
  return new Promise((resolve) => {
    const updates = [];
    const call = orders.Track(md("orders-track"));
    call.on("data", (u) => updates.push(u));
    call.on("error", (err) => { out.track = { error: err.code }; resolve(); });
    call.on("end", () => { out.track = updates; resolve(); });
    call.write({ orderId: "o-1", text: "hello" });
    call.write({ orderId: "o-2", text: "world" });
    call.end();
  });
}

function richError() {
  return new Promise((resolve) => payments.Charge({ account: "a" }, md("payments-retry"), (err) => {
    const raw = err && err.metadata.get("grpc-status-details-bin")[0];
    const status = raw ? statusType.deserialize(raw) : null;
    out.charge = { code: err ? err.code : 0, message: err ? err.details : "",
                   details: status ? status.details.map((d) => d.type_url || d.typeUrl) : [] };
    resolve();
  }));
}

(async () => {
  await unary();
  await streaming();
  await bidi();
  await richError();
  console.log(JSON.stringify(out));
  process.exit(0);
})();
